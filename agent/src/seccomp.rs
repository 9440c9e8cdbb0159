//! `linux.seccomp` compiled to a classic BPF program (before forking), installed by the child
//! with the raw `seccomp(2)` syscall as its last step before exec.
//!
//! Layout of the generated program (every jump is forward):
//!
//! ```text
//!   ld  arch;  jeq AUDIT_ARCH_X86_64 ? skip1 : next;  ret KILL_PROCESS   (other ABIs and x32
//!   ld  nr;    jge X32_SYSCALL_BIT   ? next : skip1;  ret KILL_PROCESS    numbers are killed,
//!                                                                         like libseccomp's
//!                                                                         bad-arch action)
//!   for each syscall named in the profile:  jeq nr ? next : skip1;  ja block(nr)
//!   ret defaultAction
//!   block(nr): for each rule naming nr, in profile order:
//!                 argument checks (all must hold, else jump to the next rule);  ret action
//!              ret defaultAction
//! ```
//!
//! Arguments are compared as 64-bit values (two 32-bit loads), with libseccomp's operators.
//! Names unknown on x86_64 (other architectures' syscalls) are skipped, as runc does; a profile
//! in which no name is known is refused.

use oci_spec::runtime::{LinuxSeccomp, LinuxSeccompAction, LinuxSeccompFilterFlag, LinuxSeccompOperator};

use crate::syscalls;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("seccomp: none of the syscall names in the profile is known on x86_64 (e.g. {0:?})")]
    NoKnownSyscall(String),
    #[error("seccomp: action {0} is not supported (joey has no seccomp notify agent)")]
    UnsupportedAction(String),
    #[error("seccomp: syscall {name}: argument index {index} is out of range (0-5)")]
    ArgIndex { name: String, index: usize },
    #[error("seccomp: the program has {0} instructions, more than the kernel's limit of 4096")]
    TooLong(usize),
    #[error("seccomp: internal jump too far ({0} instructions)")]
    JumpTooFar(usize),
}

const BPF_LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
const BPF_JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const BPF_JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const BPF_AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
pub const RET_KILL_PROCESS: u32 = 0x8000_0000;
pub const RET_KILL_THREAD: u32 = 0;
pub const RET_TRAP: u32 = 0x0003_0000;
pub const RET_ERRNO: u32 = 0x0005_0000;
pub const RET_TRACE: u32 = 0x7ff0_0000;
pub const RET_LOG: u32 = 0x7ffc_0000;
pub const RET_ALLOW: u32 = 0x7fff_0000;
const MAX_INSNS: usize = 4096;
/// seccomp_data offsets.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

/// A compiled filter and the `seccomp(2)` flags to install it with.
#[derive(Clone)]
pub struct Filter {
    pub program: Vec<libc::sock_filter>,
    pub flags: libc::c_ulong,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Filter({} instructions, flags {:#x})", self.program.len(), self.flags)
    }
}

/// Jump target while assembling.
#[derive(Debug, Clone, Copy)]
enum To {
    Next,
    Label(usize),
}

#[derive(Debug, Clone, Copy)]
enum Insn {
    Stmt(u16, u32),
    Jump { code: u16, k: u32, jt: To, jf: To },
    Ja(usize),
    Label(usize),
}

struct Asm {
    code: Vec<Insn>,
    labels: usize,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels += 1;
        self.labels - 1
    }
    fn ld(&mut self, off: u32) {
        self.code.push(Insn::Stmt(BPF_LD_W_ABS, off));
    }
    fn ret(&mut self, k: u32) {
        self.code.push(Insn::Stmt(BPF_RET_K, k));
    }
    fn jmp(&mut self, code: u16, k: u32, jt: To, jf: To) {
        self.code.push(Insn::Jump { code, k, jt, jf });
    }

    fn finish(self) -> Result<Vec<libc::sock_filter>, SeccompError> {
        let mut pos = vec![0usize; self.labels];
        let mut n = 0;
        for i in &self.code {
            match i {
                Insn::Label(l) => pos[*l] = n,
                _ => n += 1,
            }
        }
        if n > MAX_INSNS {
            return Err(SeccompError::TooLong(n));
        }
        let mut out = Vec::with_capacity(n);
        let rel = |pc: usize, t: To| -> Result<u8, SeccompError> {
            match t {
                To::Next => Ok(0),
                To::Label(l) => {
                    let d = pos[l] - (pc + 1);
                    u8::try_from(d).map_err(|_| SeccompError::JumpTooFar(d))
                }
            }
        };
        for i in &self.code {
            let pc = out.len();
            let f = match *i {
                Insn::Label(_) => continue,
                Insn::Stmt(code, k) => libc::sock_filter { code, jt: 0, jf: 0, k },
                Insn::Jump { code, k, jt, jf } => libc::sock_filter {
                    code,
                    jt: rel(pc, jt)?,
                    jf: rel(pc, jf)?,
                    k,
                },
                Insn::Ja(l) => libc::sock_filter {
                    code: BPF_JA,
                    jt: 0,
                    jf: 0,
                    k: (pos[l] - (pc + 1)) as u32,
                },
            };
            out.push(f);
        }
        Ok(out)
    }
}

/// The BPF return value of `action`.
pub fn action_value(action: LinuxSeccompAction, errno_ret: Option<u32>) -> Result<u32, SeccompError> {
    use LinuxSeccompAction::*;
    let data = |v: Option<u32>| v.unwrap_or(libc::EPERM as u32) & 0xffff;
    Ok(match action {
        ScmpActKill | ScmpActKillThread => RET_KILL_THREAD,
        ScmpActKillProcess => RET_KILL_PROCESS,
        ScmpActTrap => RET_TRAP,
        ScmpActErrno => RET_ERRNO | data(errno_ret),
        ScmpActTrace => RET_TRACE | data(errno_ret),
        ScmpActLog => RET_LOG,
        ScmpActAllow => RET_ALLOW,
        ScmpActNotify => return Err(SeccompError::UnsupportedAction("SCMP_ACT_NOTIFY".into())),
    })
}

/// Emits the check of one 64-bit argument: falls through when it holds, jumps to `fail` if not.
fn emit_arg(a: &mut Asm, index: usize, op: LinuxSeccompOperator, value: u64, value_two: u64, fail: usize) {
    use LinuxSeccompOperator::*;
    let lo_off = OFF_ARGS + 8 * index as u32;
    let hi_off = lo_off + 4;
    let (vhi, vlo) = ((value >> 32) as u32, value as u32);
    let f = To::Label(fail);
    match op {
        ScmpCmpEq => {
            a.ld(hi_off);
            a.jmp(BPF_JEQ_K, vhi, To::Next, f);
            a.ld(lo_off);
            a.jmp(BPF_JEQ_K, vlo, To::Next, f);
        }
        ScmpCmpNe => {
            let t = a.label();
            a.ld(hi_off);
            a.jmp(BPF_JEQ_K, vhi, To::Next, To::Label(t));
            a.ld(lo_off);
            a.jmp(BPF_JEQ_K, vlo, f, To::Next);
            a.code.push(Insn::Label(t));
        }
        ScmpCmpGt | ScmpCmpGe => {
            let t = a.label();
            a.ld(hi_off);
            a.jmp(BPF_JGT_K, vhi, To::Label(t), To::Next);
            a.jmp(BPF_JEQ_K, vhi, To::Next, f);
            a.ld(lo_off);
            let code = if op == ScmpCmpGt { BPF_JGT_K } else { BPF_JGE_K };
            a.jmp(code, vlo, To::Next, f);
            a.code.push(Insn::Label(t));
        }
        // LT is !GE, LE is !GT.
        ScmpCmpLt | ScmpCmpLe => {
            let t = a.label();
            a.ld(hi_off);
            a.jmp(BPF_JGT_K, vhi, f, To::Next);
            a.jmp(BPF_JEQ_K, vhi, To::Next, To::Label(t));
            a.ld(lo_off);
            let code = if op == ScmpCmpLe { BPF_JGT_K } else { BPF_JGE_K };
            a.jmp(code, vlo, f, To::Next);
            a.code.push(Insn::Label(t));
        }
        // (arg & value) == valueTwo
        ScmpCmpMaskedEq => {
            let (dhi, dlo) = ((value_two >> 32) as u32, value_two as u32);
            a.ld(hi_off);
            a.code.push(Insn::Stmt(BPF_AND_K, vhi));
            a.jmp(BPF_JEQ_K, dhi, To::Next, f);
            a.ld(lo_off);
            a.code.push(Insn::Stmt(BPF_AND_K, vlo));
            a.jmp(BPF_JEQ_K, dlo, To::Next, f);
        }
    }
}

/// One rule for one syscall: argument checks and the action value.
struct Rule<'a> {
    args: &'a [oci_spec::runtime::LinuxSeccompArg],
    ret: u32,
}

/// Compiles `s` for x86_64.
pub fn compile(s: &LinuxSeccomp) -> Result<Filter, SeccompError> {
    let default = action_value(s.default_action(), s.default_errno_ret())?;
    // Syscall numbers in order of first appearance, with their rules in profile order.
    let mut order: Vec<u32> = Vec::new();
    let mut rules: std::collections::HashMap<u32, Vec<Rule<'_>>> = Default::default();
    let mut unknown: Option<String> = None;
    for sc in s.syscalls().as_deref().unwrap_or_default() {
        let ret = action_value(sc.action(), sc.errno_ret())?;
        let args = sc.args().as_deref().unwrap_or_default();
        for name in sc.names() {
            if let Some(a) = args.iter().find(|a| a.index() > 5) {
                return Err(SeccompError::ArgIndex {
                    name: name.clone(),
                    index: a.index(),
                });
            }
            let Some(nr) = syscalls::number(name) else {
                unknown.get_or_insert_with(|| name.clone());
                continue;
            };
            let e = rules.entry(nr).or_default();
            if e.is_empty() {
                order.push(nr);
            }
            e.push(Rule { args, ret });
        }
    }
    if order.is_empty() {
        if let Some(name) = unknown {
            return Err(SeccompError::NoKnownSyscall(name));
        }
    }

    let mut a = Asm {
        code: Vec::new(),
        labels: 0,
    };
    let native = a.label();
    a.ld(OFF_ARCH);
    a.jmp(BPF_JEQ_K, AUDIT_ARCH_X86_64, To::Label(native), To::Next);
    a.ret(RET_KILL_PROCESS);
    a.code.push(Insn::Label(native));
    let x64 = a.label();
    a.ld(OFF_NR);
    a.jmp(BPF_JGE_K, X32_SYSCALL_BIT, To::Next, To::Label(x64));
    a.ret(RET_KILL_PROCESS);
    a.code.push(Insn::Label(x64));
    let blocks: Vec<usize> = order.iter().map(|_| a.label()).collect();
    for (nr, block) in order.iter().zip(&blocks) {
        let skip = a.label();
        a.jmp(BPF_JEQ_K, *nr, To::Next, To::Label(skip));
        a.code.push(Insn::Ja(*block));
        a.code.push(Insn::Label(skip));
    }
    a.ret(default);
    for (nr, block) in order.iter().zip(&blocks) {
        a.code.push(Insn::Label(*block));
        for rule in &rules[nr] {
            let next = a.label();
            for arg in rule.args {
                emit_arg(&mut a, arg.index(), arg.op(), arg.value(), arg.value_two().unwrap_or(0), next);
            }
            a.ret(rule.ret);
            a.code.push(Insn::Label(next));
        }
        a.ret(default);
    }
    let program = a.finish()?;

    let mut flags: libc::c_ulong = 0;
    for f in s.flags().as_deref().unwrap_or_default() {
        match f {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => flags |= libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                flags |= libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            // One thread (the forked child); no notify listener.
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync
            | LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {}
        }
    }
    Ok(Filter { program, flags })
}

/// Installs `f` on the calling thread. Async-signal-safe (one raw syscall); the caller must
/// have set no_new_privs or hold CAP_SYS_ADMIN.
pub fn install(f: &Filter) -> std::io::Result<()> {
    let prog = libc::sock_fprog {
        len: f.program.len() as libc::c_ushort,
        filter: f.program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp(SECCOMP_SET_MODE_FILTER) reads `prog` and the instructions it points to,
    // both alive for the duration of the call; the kernel copies the program.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            f.flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal classic-BPF interpreter for the instructions the compiler emits.
    fn run(prog: &[libc::sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut acc, mut pc) = (0u32, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                BPF_LD_W_ABS => {
                    let o = i.k as usize;
                    acc = u32::from_le_bytes(data[o..o + 4].try_into().unwrap());
                }
                BPF_AND_K => acc &= i.k,
                BPF_RET_K => return i.k,
                BPF_JA => pc += i.k as usize,
                BPF_JEQ_K | BPF_JGT_K | BPF_JGE_K => {
                    let c = match i.code {
                        BPF_JEQ_K => acc == i.k,
                        BPF_JGT_K => acc > i.k,
                        _ => acc >= i.k,
                    };
                    pc += if c { i.jt } else { i.jf } as usize;
                }
                c => panic!("unexpected opcode {c:#x}"),
            }
        }
    }

    fn profile(json: &str) -> LinuxSeccomp {
        serde_json::from_str(json).expect("valid seccomp json")
    }

    const X: u32 = AUDIT_ARCH_X86_64;
    fn nr(n: &str) -> u32 {
        syscalls::number(n).unwrap()
    }

    #[test]
    fn allowlist_with_errno_default() {
        let f = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ERRNO","defaultErrnoRet":38,
                "architectures":["SCMP_ARCH_X86_64","SCMP_ARCH_X86"],
                "syscalls":[{"names":["read","write","_llseek"],"action":"SCMP_ACT_ALLOW"},
                            {"names":["mkdir"],"action":"SCMP_ACT_ERRNO","errnoRet":1}]}"#,
        ))
        .unwrap();
        assert_eq!(run(&f.program, nr("read"), X, [0; 6]), RET_ALLOW);
        assert_eq!(run(&f.program, nr("write"), X, [0; 6]), RET_ALLOW);
        assert_eq!(run(&f.program, nr("mkdir"), X, [0; 6]), RET_ERRNO | 1);
        assert_eq!(run(&f.program, nr("mount"), X, [0; 6]), RET_ERRNO | 38);
        // Another ABI, or x32 numbers: killed.
        assert_eq!(run(&f.program, 3, 0x4000_0003, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(run(&f.program, X32_SYSCALL_BIT | 1, X, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(f.flags, 0);
    }

    #[test]
    fn argument_operators_compare_64_bits() {
        let rule = |op: &str, v: u64, v2: u64| {
            let p = profile(&format!(
                r#"{{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{{"names":["personality"],
                "action":"SCMP_ACT_ERRNO","args":[{{"index":1,"value":{v},"valueTwo":{v2},"op":"{op}"}}]}}]}}"#
            ));
            compile(&p).unwrap().program
        };
        let pers = nr("personality");
        let hit = |p: &[libc::sock_filter], a1: u64| run(p, pers, X, [0, a1, 0, 0, 0, 0]) == RET_ERRNO | 1;
        let big = 0x1_0000_0005u64;
        for (op, v, cases) in [
            ("SCMP_CMP_EQ", big, [(big, true), (5, false), (big + 1, false)]),
            ("SCMP_CMP_NE", big, [(big, false), (5, true), (0x2_0000_0005, true)]),
            ("SCMP_CMP_GT", big, [(big, false), (big + 1, true), (0x2_0000_0000, true)]),
            ("SCMP_CMP_GE", big, [(big, true), (big - 1, false), (6, false)]),
            ("SCMP_CMP_LT", big, [(big, false), (big - 1, true), (0x2_0000_0000, false)]),
            ("SCMP_CMP_LE", big, [(big, true), (big + 1, false), (7, true)]),
        ] {
            let p = rule(op, v, 0);
            for (arg, expect) in cases {
                assert_eq!(hit(&p, arg), expect, "{op} {v:#x} vs {arg:#x}");
            }
        }
        let p = rule("SCMP_CMP_MASKED_EQ", 0xff00_0000_00ff, 0x1200_0000_0034);
        assert!(hit(&p, 0x1234_5678_9a34));
        assert!(!hit(&p, 0x1234_5678_9a35));
        // Other syscalls and argument values fall to the default.
        assert_eq!(run(&rule("SCMP_CMP_EQ", 1, 0), nr("read"), X, [0; 6]), RET_ALLOW);
    }

    #[test]
    fn several_rules_for_one_syscall_first_match_wins() {
        let f = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_KILL_PROCESS","flags":["SECCOMP_FILTER_FLAG_LOG"],"syscalls":[
                {"names":["socket"],"action":"SCMP_ACT_ALLOW","args":[{"index":0,"value":1,"op":"SCMP_CMP_EQ"}]},
                {"names":["socket"],"action":"SCMP_ACT_ERRNO","args":[{"index":0,"value":2,"op":"SCMP_CMP_EQ"},
                                                                       {"index":1,"value":1,"op":"SCMP_CMP_EQ"}]},
                {"names":["socket"],"action":"SCMP_ACT_TRAP"}]}"#,
        ))
        .unwrap();
        let s = nr("socket");
        assert_eq!(run(&f.program, s, X, [1, 0, 0, 0, 0, 0]), RET_ALLOW);
        assert_eq!(run(&f.program, s, X, [2, 1, 0, 0, 0, 0]), RET_ERRNO | libc::EPERM as u32);
        assert_eq!(run(&f.program, s, X, [2, 2, 0, 0, 0, 0]), RET_TRAP);
        assert_eq!(run(&f.program, nr("read"), X, [0; 6]), RET_KILL_PROCESS);
        assert_eq!(f.flags, libc::SECCOMP_FILTER_FLAG_LOG);
    }

    #[test]
    fn bad_profiles_are_refused() {
        let e = compile(&profile(r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chown32"],"action":"SCMP_ACT_ERRNO"}]}"#))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "seccomp: none of the syscall names in the profile is known on x86_64 (e.g. \"chown32\")"
        );
        let e = compile(&profile(r#"{"defaultAction":"SCMP_ACT_NOTIFY"}"#)).unwrap_err();
        assert!(matches!(e, SeccompError::UnsupportedAction(_)));
        let e = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["read"],"action":"SCMP_ACT_ERRNO","args":[{"index":6,"value":1,"op":"SCMP_CMP_EQ"}]}]}"#,
        ))
        .unwrap_err();
        assert_eq!(e.to_string(), "seccomp: syscall read: argument index 6 is out of range (0-5)");
    }

    #[test]
    fn every_known_syscall_fits_in_one_program() {
        let names: Vec<String> = syscalls::SYSCALLS_X86_64.iter().map(|(n, _)| format!("{n:?}")).collect();
        let p = profile(&format!(
            r#"{{"defaultAction":"SCMP_ACT_ERRNO","syscalls":[{{"names":[{}],"action":"SCMP_ACT_ALLOW"}}]}}"#,
            names.join(",")
        ));
        let f = compile(&p).unwrap();
        assert!(f.program.len() < MAX_INSNS);
        assert_eq!(run(&f.program, nr("clone3"), X, [0; 6]), RET_ALLOW);
    }

    /// Installs a filter in a forked child and checks that the denied syscall fails with the
    /// chosen errno while others work.
    #[test]
    fn installed_filter_denies_with_errno() {
        let f = compile(&profile(
            r#"{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["getppid"],"action":"SCMP_ACT_ERRNO","errnoRet":42}]}"#,
        ))
        .unwrap();
        // SAFETY: the child only makes raw syscalls (prctl, seccomp, getppid, getpid, _exit) on
        // memory prepared before the fork.
        unsafe {
            let pid = libc::fork();
            assert!(pid >= 0);
            if pid == 0 {
                if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 || install(&f).is_err() {
                    libc::_exit(90);
                }
                let r = libc::syscall(libc::SYS_getppid);
                let errno = *libc::__errno_location();
                let ok = r == -1 && errno == 42 && libc::syscall(libc::SYS_getpid) > 0;
                libc::_exit(if ok { 0 } else { 91 });
            }
            let mut status = 0;
            assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
            assert!(libc::WIFEXITED(status), "status {status:#x}");
            assert_eq!(libc::WEXITSTATUS(status), 0);
        }
    }
}
