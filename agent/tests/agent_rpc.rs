//! End-to-end tests: start the agent binary in `--listen unix://` mode and drive it with the
//! generated async ttrpc client.

use std::future::Future;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use joey_agent_protocol::agent::{
    CheckRequest, CloseStdinRequest, DestroySandboxRequest, Empty, ExecProcessRequest,
    ReadOutputRequest, SignalProcessRequest, WaitProcessRequest, WaitProcessResponse,
    WriteStdinRequest,
};
use joey_agent_protocol::agent_ttrpc::AgentServiceClient;
use ttrpc::context;
use ttrpc::Code;

const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A running agent plus a connected client. Killed on drop.
struct TestAgent {
    child: Child,
    client: AgentServiceClient,
    _dir: tempfile::TempDir,
}

impl TestAgent {
    async fn start() -> TestAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let cmd = Command::new(env!("CARGO_BIN_EXE_joey-agent"));
        TestAgent::start_with(cmd, dir).await
    }

    /// Starts `cmd --listen unix://DIR/agent.sock` and connects to it.
    async fn start_with(mut cmd: Command, dir: tempfile::TempDir) -> TestAgent {
        let sock = dir.path().join("agent.sock");
        let addr = format!("unix://{}", sock.display());
        let child = cmd
            .arg("--listen")
            .arg(&addr)
            .stdin(Stdio::null())
            .spawn()
            .expect("start joey-agent");
        let deadline = Instant::now() + Duration::from_secs(20);
        let client = loop {
            if sock.exists() {
                if let Ok(c) = ttrpc::asynchronous::Client::connect(&addr).await {
                    break c;
                }
            }
            assert!(Instant::now() < deadline, "agent did not start listening");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        TestAgent {
            child,
            client: AgentServiceClient::new(client),
            _dir: dir,
        }
    }

    /// The agent process is still running and answers Check.
    async fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "agent exited"
        );
        let resp = self
            .client
            .check(ctx(), &CheckRequest::new())
            .await
            .expect("check");
        assert_eq!(resp.status, "SERVING");
    }

    async fn exec_full(
        &self,
        id: &str,
        argv: &[&str],
        env: &[&str],
        cwd: &str,
        terminal: bool,
    ) -> ttrpc::Result<u32> {
        let req = ExecProcessRequest {
            exec_id: id.into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env.iter().map(|s| s.to_string()).collect(),
            cwd: cwd.into(),
            terminal,
            ..Default::default()
        };
        self.client.exec_process(ctx(), &req).await.map(|r| r.pid)
    }

    async fn exec(&self, id: &str, argv: &[&str]) -> u32 {
        self.exec_full(id, argv, &[], "", false)
            .await
            .unwrap_or_else(|e| panic!("exec {argv:?}: {e:?}"))
    }

    async fn read_chunk(&self, id: &str, stderr: bool, len: u32) -> ttrpc::Result<Vec<u8>> {
        let req = ReadOutputRequest {
            exec_id: id.into(),
            len,
            ..Default::default()
        };
        let resp = if stderr {
            self.client.read_stderr(ctx(), &req).await?
        } else {
            self.client.read_stdout(ctx(), &req).await?
        };
        Ok(resp.data)
    }

    async fn read_all(&self, id: &str, stderr: bool) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let chunk = self.read_chunk(id, stderr, 0).await.expect("read");
            if chunk.is_empty() {
                return out;
            }
            out.extend_from_slice(&chunk);
        }
    }

    async fn wait(&self, id: &str) -> WaitProcessResponse {
        let req = WaitProcessRequest {
            exec_id: id.into(),
            ..Default::default()
        };
        self.client.wait_process(ctx(), &req).await.expect("wait")
    }

    async fn write(&self, id: &str, data: &[u8]) -> ttrpc::Result<u32> {
        let req = WriteStdinRequest {
            exec_id: id.into(),
            data: data.to_vec(),
            ..Default::default()
        };
        self.client.write_stdin(ctx(), &req).await.map(|r| r.len)
    }

    async fn close_stdin(&self, id: &str) -> ttrpc::Result<Empty> {
        let req = CloseStdinRequest {
            exec_id: id.into(),
            ..Default::default()
        };
        self.client.close_stdin(ctx(), &req).await
    }

    async fn signal(&self, id: &str, signal: u32) -> ttrpc::Result<Empty> {
        let req = SignalProcessRequest {
            exec_id: id.into(),
            signal,
            ..Default::default()
        };
        self.client.signal_process(ctx(), &req).await
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctx() -> ttrpc::context::Context {
    context::with_timeout(0)
}

/// Asserts `r` failed with `code`; returns the status message.
fn expect_code<T: std::fmt::Debug>(r: ttrpc::Result<T>, code: Code) -> String {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => {
            assert_eq!(s.code(), code, "unexpected status {s:?}");
            s.message().to_string()
        }
        other => panic!("expected {code:?}, got {other:?}"),
    }
}

async fn with_timeout<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(TEST_TIMEOUT, f)
        .await
        .expect("test timed out");
}

#[tokio::test]
async fn echo_out_err_and_exit_code() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        let pid = a
            .exec("e1", &["sh", "-c", "echo out; echo err >&2; exit 3"])
            .await;
        assert!(pid > 0);
        assert_eq!(a.read_all("e1", false).await, b"out\n");
        assert_eq!(a.read_all("e1", true).await, b"err\n");
        // WaitProcess may be called many times.
        for _ in 0..3 {
            let w = a.wait("e1").await;
            assert!(w.exited);
            assert_eq!((w.exit_code, w.signal, w.status), (3, 0, 3));
        }
        // Reads after EOF keep returning EOF.
        assert!(a
            .read_chunk("e1", false, 10)
            .await
            .expect("read")
            .is_empty());
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn version_env_and_cwd() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        let v = a
            .client
            .version(ctx(), &Empty::new())
            .await
            .expect("version");
        assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(v.protocol_version, joey_agent_protocol::PROTOCOL_VERSION);
        assert!(!v.kernel_release.is_empty());

        a.exec_full(
            "env",
            &["sh", "-c", "echo \"$FOO|$PATH|$(pwd)\""],
            &["FOO=bar baz"],
            "/tmp",
            false,
        )
        .await
        .expect("exec");
        let out = String::from_utf8(a.read_all("env", false).await).expect("utf8");
        assert_eq!(
            out,
            "bar baz|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin|/tmp\n"
        );
        assert_eq!(a.wait("env").await.status, 0);
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn children_start_with_empty_signal_mask_and_default_dispositions() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        a.exec("status", &["cat", "/proc/self/status"]).await;
        let status = String::from_utf8(a.read_all("status", false).await).expect("utf8");
        for field in ["SigBlk:", "SigIgn:"] {
            let line = status
                .lines()
                .find(|l| l.starts_with(field))
                .unwrap_or_else(|| panic!("no {field} in {status}"));
            let mask = line[field.len()..].trim();
            assert!(mask.chars().all(|c| c == '0'), "{line}");
        }
        assert_eq!(a.wait("status").await.status, 0);
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn self_sigkill_reports_signal_9() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        a.exec("k", &["sh", "-c", "kill -KILL $$"]).await;
        let w = a.wait("k").await;
        assert!(!w.exited);
        assert_eq!((w.signal, w.status), (9, 137));
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn exec_errors() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        let msg = expect_code(
            a.exec_full("n1", &["no-such-command-xyz"], &[], "", false)
                .await,
            Code::NOT_FOUND,
        );
        assert_eq!(msg, "executable file not found: no-such-command-xyz");
        expect_code(
            a.exec_full("n2", &["/no/such/binary"], &[], "", false)
                .await,
            Code::NOT_FOUND,
        );
        expect_code(
            a.exec_full("n3", &[], &[], "", false).await,
            Code::INVALID_ARGUMENT,
        );
        let msg = expect_code(
            a.exec_full("n4", &["true"], &[], "/no/such/dir", false)
                .await,
            Code::INVALID_ARGUMENT,
        );
        assert!(msg.contains("/no/such/dir"), "{msg}");
        expect_code(
            a.exec_full("n5", &["true"], &["NOEQUALS"], "", false).await,
            Code::INVALID_ARGUMENT,
        );
        // A file without execute permission.
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("script.sh");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").expect("write");
        let script = script.display().to_string();
        expect_code(
            a.exec_full("n6", &[&script], &[], "", false).await,
            Code::PERMISSION_DENIED,
        );
        // Executable, but execve fails (missing interpreter): std's internal wait for the
        // failed child must not race with the reaper, and the error must come back.
        let bad_interp = dir.path().join("bad-interp.sh");
        std::fs::write(&bad_interp, "#!/no/such/interpreter\n").expect("write");
        std::fs::set_permissions(
            &bad_interp,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        let bad_interp = bad_interp.display().to_string();
        expect_code(
            a.exec_full("n7", &[&bad_interp], &[], "", false).await,
            Code::NOT_FOUND,
        );
        // A failed exec does not reserve the id; a successful one does.
        a.exec("n1", &["true"]).await;
        expect_code(
            a.exec_full("n1", &["true"], &[], "", false).await,
            Code::ALREADY_EXISTS,
        );
        assert_eq!(a.wait("n1").await.status, 0);
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn stdin_is_forwarded_to_cat() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        a.exec("cat", &["cat"]).await;
        let mut expected = b"hello\n".to_vec();
        assert_eq!(a.write("cat", b"hello\n").await.expect("write"), 6);
        // More than a pipe buffer, binary, while nobody reads yet: the write must not block
        // the agent (reads below run concurrently).
        let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = async {
            assert_eq!(a.write("cat", &big).await.expect("write"), big.len() as u32);
            a.close_stdin("cat").await.expect("close stdin");
        };
        let (_, out) = tokio::join!(writer, a.read_all("cat", false));
        expected.extend_from_slice(&big);
        assert_eq!(out.len(), expected.len());
        assert!(out == expected, "stdout differs from stdin");
        assert_eq!(a.wait("cat").await.status, 0);
        // Writing after close is an error, closing again is fine.
        expect_code(a.write("cat", b"x").await, Code::FAILED_PRECONDITION);
        a.close_stdin("cat").await.expect("second close");
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn one_mib_binary_output_is_intact() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("random.bin");
        let cmd = format!("head -c 1048576 /dev/urandom | tee {}", file.display());
        a.exec("big", &["sh", "-c", &cmd]).await;
        let (out, err) = tokio::join!(a.read_all("big", false), a.read_all("big", true));
        assert!(err.is_empty());
        let expected = std::fs::read(&file).expect("read file");
        assert_eq!(expected.len(), 1 << 20);
        assert_eq!(out.len(), expected.len());
        assert!(out == expected, "output differs from file");
        assert_eq!(a.wait("big").await.status, 0);
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn read_len_is_respected() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        a.exec("r", &["sh", "-c", "printf abcdefghij"]).await;
        assert_eq!(a.wait("r").await.status, 0);
        let first = a.read_chunk("r", false, 4).await.expect("read");
        assert_eq!(first, b"abcd");
        let rest = a.read_all("r", false).await;
        assert_eq!(rest, b"efghij");
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn unknown_exec_id_is_not_found() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        let id = "nope";
        expect_code(a.signal(id, 15).await, Code::NOT_FOUND);
        expect_code(a.write(id, b"x").await, Code::NOT_FOUND);
        expect_code(a.close_stdin(id).await, Code::NOT_FOUND);
        expect_code(a.read_chunk(id, false, 0).await, Code::NOT_FOUND);
        expect_code(a.read_chunk(id, true, 0).await, Code::NOT_FOUND);
        let req = WaitProcessRequest {
            exec_id: id.into(),
            ..Default::default()
        };
        expect_code(a.client.wait_process(ctx(), &req).await, Code::NOT_FOUND);
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn terminal_mode_echoes() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        a.exec_full(
            "tty",
            &["sh", "-c", "test -t 0 && read line && echo \"got:$line\""],
            &[],
            "",
            true,
        )
        .await
        .expect("exec tty");
        a.write("tty", b"abc\n").await.expect("write");
        let out = String::from_utf8_lossy(&a.read_all("tty", false).await).into_owned();
        // The terminal echoes the input, then the program's answer follows (with \r\n).
        assert!(out.contains("abc\r\n"), "no echo in {out:?}");
        assert!(out.contains("got:abc\r\n"), "no answer in {out:?}");
        assert!(a.read_all("tty", true).await.is_empty());
        assert_eq!(a.wait("tty").await.status, 0);

        // CloseStdin on a terminal delivers EOF to the reader.
        a.exec_full("tcat", &["cat"], &[], "", true)
            .await
            .expect("exec tty cat");
        a.write("tcat", b"xyz\n").await.expect("write");
        a.close_stdin("tcat").await.expect("close");
        let out = String::from_utf8_lossy(&a.read_all("tcat", false).await).into_owned();
        assert!(out.contains("xyz"), "{out:?}");
        assert_eq!(a.wait("tcat").await.status, 0);
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn signals() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        a.exec("done", &["true"]).await;
        assert_eq!(a.wait("done").await.status, 0);
        let msg = expect_code(a.signal("done", 15).await, Code::NOT_FOUND);
        assert!(msg.contains("process already exited"), "{msg}");

        a.exec("sleeper", &["sleep", "30"]).await;
        expect_code(a.signal("sleeper", 0).await, Code::INVALID_ARGUMENT);
        expect_code(a.signal("sleeper", 1000).await, Code::INVALID_ARGUMENT);
        a.signal("sleeper", 15).await.expect("SIGTERM");
        let w = a.wait("sleeper").await;
        assert_eq!((w.exited, w.signal, w.status), (false, 15, 143));
        a.assert_alive().await;
    })
    .await;
}

#[tokio::test]
async fn orphans_are_reaped_without_stealing_statuses() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        // The background sleep is orphaned and re-parented to the agent (subreaper).
        a.exec("orphan", &["sh", "-c", "sleep 0.2 & exit 5"]).await;
        let ids: Vec<String> = (0..20).map(|i| format!("p{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            a.exec(id, &["sh", "-c", &format!("exit {i}")]).await;
        }
        assert_eq!(a.wait("orphan").await.status, 5);
        for (i, id) in ids.iter().enumerate() {
            let w = a.wait(id).await;
            assert_eq!((w.exited, w.exit_code), (true, i as i32), "{id}");
        }
        // Concurrent waits on a running process all see its exit.
        a.exec("slow", &["sh", "-c", "sleep 0.3; exit 7"]).await;
        let (w1, w2) = tokio::join!(a.wait("slow"), a.wait("slow"));
        assert_eq!((w1.status, w2.status), (7, 7));
        tokio::time::sleep(Duration::from_millis(400)).await;
        a.assert_alive().await;
        assert_no_zombie_children(a.child.id());
    })
    .await;
}

/// No zombie is left among the agent's children (Linux /proc).
fn assert_no_zombie_children(agent_pid: u32) {
    let children = format!("/proc/{agent_pid}/task/{agent_pid}/children");
    let Ok(list) = std::fs::read_to_string(&children) else {
        return; // CONFIG_PROC_CHILDREN missing: nothing to check.
    };
    for pid in list.split_whitespace() {
        let stat =
            std::fs::read_to_string(Path::new("/proc").join(pid).join("stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .next();
        assert_ne!(state, Some("Z"), "zombie child {pid}: {stat}");
    }
}

#[tokio::test]
async fn destroy_sandbox_exits_in_listen_mode() {
    with_timeout(async {
        let mut a = TestAgent::start().await;
        a.exec("sleeper", &["sleep", "30"]).await;
        a.client
            .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
            .await
            .expect("destroy");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = a.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(Instant::now() < deadline, "agent did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(status.success(), "{status:?}");
    })
    .await;
}

/// PID 1 mode without a VM: the agent as init of a new PID + mount namespace (needs root and
/// util-linux `unshare`; skipped otherwise). Exercises the mounts, /dev/ptmx of the private
/// devpts instance, orphan reaping as real PID 1, and DestroySandbox's reboot (which ends the
/// namespace).
#[tokio::test]
async fn pid1_mode_in_pid_namespace() {
    with_timeout(async {
        let probe = Command::new("unshare")
            .args([
                "--pid",
                "--fork",
                "--mount",
                "--propagation",
                "private",
                "true",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // A missing prerequisite fails the test with the reason (tests never skip silently).
        assert!(
            matches!(probe, Ok(ref s) if s.success()),
            "this test needs PID and mount namespaces (unshare --pid --fork --mount, as root): {probe:?}"
        );
        // The agent mounts tmpfs over /tmp and /run in its namespace: keep the socket elsewhere.
        let dir = tempfile::Builder::new()
            .tempdir_in("/var/tmp")
            .unwrap_or_else(|e| panic!("this test keeps its socket under /var/tmp: {e}"));
        let mut cmd = Command::new("unshare");
        cmd.args([
            "--pid",
            "--fork",
            "--kill-child",
            "--mount",
            "--propagation",
            "private",
            env!("CARGO_BIN_EXE_joey-agent"),
        ]);
        let mut a = TestAgent::start_with(cmd, dir).await;

        let script = "cat /proc/1/comm; test -c /dev/null && echo dev-ok; \
            grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts && echo cgroup-ok; \
            grep -q ' /dev/pts devpts ' /proc/mounts && echo pts-ok; \
            grep -q ' /tmp tmpfs ' /proc/mounts && echo tmp-ok; echo \"$PATH\"";
        a.exec("probe", &["sh", "-c", script]).await;
        let out = String::from_utf8(a.read_all("probe", false).await).expect("utf8");
        assert_eq!(
            out,
            "joey-agent\ndev-ok\ncgroup-ok\npts-ok\ntmp-ok\n\
             /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
        );
        assert_eq!(a.wait("probe").await.status, 0);

        // A terminal from the namespace's own devpts instance.
        a.exec_full("tty", &["tty"], &[], "", true)
            .await
            .expect("exec tty");
        let out = String::from_utf8_lossy(&a.read_all("tty", false).await).into_owned();
        assert!(out.starts_with("/dev/pts/"), "{out:?}");
        assert_eq!(a.wait("tty").await.status, 0);

        // Orphans are re-parented to PID 1 (the agent) and reaped.
        a.exec("orphan", &["sh", "-c", "sleep 0.1 & exit 4"]).await;
        assert_eq!(a.wait("orphan").await.status, 4);
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.exec(
            "zombies",
            &[
                "sh",
                "-c",
                "grep -l '^State:.*Z' /proc/[0-9]*/status || true",
            ],
        )
        .await;
        let zombies = a.read_all("zombies", false).await;
        assert!(zombies.is_empty(), "{}", String::from_utf8_lossy(&zombies));
        a.assert_alive().await;

        // DestroySandbox reboots, which for a PID namespace means its init is killed.
        a.client
            .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
            .await
            .expect("destroy");
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.child.try_wait().expect("try_wait").is_none() {
            assert!(Instant::now() < deadline, "namespace did not end");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn create_container_errors_name_the_problem() {
    use joey_agent_protocol::agent::CreateContainerRequest;
    with_timeout(async {
        let mut agent = TestAgent::start().await;
        let req = |id: &str, rootfs: &str| CreateContainerRequest {
            container_id: id.into(),
            rootfs: rootfs.into(),
            argv: vec!["sh".into()],
            ..Default::default()
        };
        let cases = [
            (req("c1", "/run/joey/shared/no-such-ctr/rootfs"), Code::NOT_FOUND, "/run/joey/shared/no-such-ctr/rootfs"),
            (req("c1", "/tmp"), Code::INVALID_ARGUMENT, "/tmp"),
            (req("c1", "/run/joey/shared/../x"), Code::INVALID_ARGUMENT, "/run/joey/shared/../x"),
            (req("../c1", "/run/joey/shared/c1/rootfs"), Code::INVALID_ARGUMENT, "../c1"),
            (req("", "/run/joey/shared/c1/rootfs"), Code::INVALID_ARGUMENT, "container id"),
        ];
        for (r, code, needle) in cases {
            let msg = expect_code(agent.client.create_container(ctx(), &r).await, code);
            assert!(msg.contains(needle), "{msg}");
        }
        let mut no_argv = req("c1", "/run/joey/shared/c1/rootfs");
        no_argv.argv.clear();
        expect_code(agent.client.create_container(ctx(), &no_argv).await, Code::INVALID_ARGUMENT);
        agent.assert_alive().await;
    })
    .await;
}

/// The container RPCs' error answers in host mode (no container is started here: the OCI path
/// itself runs in the guest, see docs/agent.md).
#[tokio::test]
async fn container_rpc_errors_name_the_problem() {
    use joey_agent_protocol::agent::{
        ContainerRequest, CreateContainerRequest, ResizeTerminalRequest, UpdateContainerRequest,
    };
    with_timeout(async {
        let mut a = TestAgent::start().await;
        let cr = |id: &str| ContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        let c = &a.client;
        for msg in [
            expect_code(c.pause_container(ctx(), &cr("ghost")).await, Code::NOT_FOUND),
            expect_code(c.resume_container(ctx(), &cr("ghost")).await, Code::NOT_FOUND),
            expect_code(c.stats_container(ctx(), &cr("ghost")).await, Code::NOT_FOUND),
            expect_code(c.list_pids(ctx(), &cr("ghost")).await, Code::NOT_FOUND),
            expect_code(c.remove_container(ctx(), &cr("ghost")).await, Code::NOT_FOUND),
            expect_code(
                c.update_container(
                    ctx(),
                    &UpdateContainerRequest {
                        container_id: "ghost".into(),
                        resources_json: "{}".into(),
                        ..Default::default()
                    },
                )
                .await,
                Code::NOT_FOUND,
            ),
        ] {
            assert_eq!(msg, "unknown container: ghost");
        }

        // Exec into an unknown container; an OCI process without a container.
        let exec = |container: &str, json: &str| ExecProcessRequest {
            exec_id: "e1".into(),
            container_id: container.into(),
            argv: vec!["true".into()],
            oci_process_json: json.into(),
            ..Default::default()
        };
        let msg = expect_code(c.exec_process(ctx(), &exec("ghost", "")).await, Code::NOT_FOUND);
        assert_eq!(msg, "unknown container: ghost");
        let msg = expect_code(
            c.exec_process(ctx(), &exec("", r#"{"args":["true"],"cwd":"/","user":{"uid":0,"gid":0}}"#)).await,
            Code::INVALID_ARGUMENT,
        );
        assert_eq!(msg, "oci_process_json needs a container_id");

        // Bad OCI specs are refused before anything starts, naming the culprit.
        let spec = |process_extra: &str, mounts: &str| CreateContainerRequest {
            container_id: "c1".into(),
            oci_spec_json: format!(
                r#"{{"ociVersion":"1.1.0","root":{{"path":"/run/joey/shared/c1/rootfs"}},
                "process":{{"user":{{"uid":0,"gid":0}},"args":["sh"],"cwd":"/"{process_extra}}},
                "mounts":[{mounts}]}}"#
            ),
            ..Default::default()
        };
        let cases = [
            (spec(r#","rlimits":[{"type":"RLIMIT_FOO","hard":1,"soft":1}]"#, ""), "invalid rlimit type \"RLIMIT_FOO\""),
            (spec(r#","capabilities":{"bounding":["CAP_NOPE"]}"#, ""), "invalid capability \"CAP_NOPE\" in the bounding set"),
            (
                spec("", r#"{"destination":"/data","type":"bind","source":"/etc/shadow","options":["rbind"]}"#),
                "mount 0 (/data): bind source /etc/shadow is outside the shared directory",
            ),
            (
                spec("", r#"{"destination":"/x","type":"ext4","source":"/dev/vda"}"#),
                "mount 0 (/x): unsupported mount type \"ext4\"",
            ),
        ];
        for (req, want) in cases {
            let msg = expect_code(c.create_container(ctx(), &req).await, Code::INVALID_ARGUMENT);
            assert_eq!(msg, want);
        }
        let mut bad_json = spec("", "");
        bad_json.oci_spec_json = "{".into();
        let msg = expect_code(c.create_container(ctx(), &bad_json).await, Code::INVALID_ARGUMENT);
        assert!(msg.starts_with("invalid OCI spec: "), "{msg}");

        // Window size of a process without a terminal; of an unknown exec id.
        a.exec("plain", &["true"]).await;
        let resize = |id: &str| ResizeTerminalRequest {
            exec_id: id.into(),
            rows: 24,
            cols: 80,
            ..Default::default()
        };
        let msg = expect_code(a.client.resize_terminal(ctx(), &resize("plain")).await, Code::FAILED_PRECONDITION);
        assert_eq!(msg, "process plain has no terminal");
        expect_code(a.client.resize_terminal(ctx(), &resize("nope")).await, Code::NOT_FOUND);

        // A terminal process accepts a new size, which it then reports.
        a.exec_full("tty", &["sh", "-c", "sleep 0.5; stty size"], &[], "", true)
            .await
            .expect("exec tty");
        a.client.resize_terminal(ctx(), &resize("tty")).await.expect("resize");
        let out = String::from_utf8_lossy(&a.read_all("tty", false).await).into_owned();
        assert_eq!(out.trim(), "24 80");
        assert_eq!(a.wait("tty").await.status, 0);

        // No OOM happened: the long poll is still waiting when its deadline passes.
        let r = a
            .client
            .get_oom_event(context::with_timeout(300_000_000), &Empty::new())
            .await;
        assert!(r.is_err(), "{r:?}");
        a.assert_alive().await;
    })
    .await;
}

/// ConfigureNetwork over ttrpc, with the agent in a network namespace of its own (needs root
/// and util-linux `unshare`): a veth pair made there as a virtio-net device would appear (known
/// MAC) becomes the pod's `eth0`; the result is read back with iproute2 run by the agent.
#[tokio::test]
async fn configure_network_in_the_agents_namespace() {
    use joey_agent_protocol::agent::{
        ConfigureNetworkRequest, NetInterface, NetNeighbor, NetRoute,
    };
    with_timeout(async {
        let mut cmd = Command::new("unshare");
        cmd.args(["--net", env!("CARGO_BIN_EXE_joey-agent")]);
        let mut a = TestAgent::start_with(cmd, tempfile::tempdir().expect("tempdir")).await;
        let sh = |id: &'static str, script: &'static str| {
            let a = &a;
            async move {
                a.exec(id, &["sh", "-c", script]).await;
                let out = String::from_utf8(a.read_all(id, false).await).expect("utf8");
                let err = String::from_utf8_lossy(&a.read_all(id, true).await).into_owned();
                assert_eq!(a.wait(id).await.status, 0, "{script}: {err}");
                out
            }
        };
        sh(
            "veth",
            "ip link add pa0 address 02:00:00:c8:00:01 type veth peer name pb0 && ip link set pb0 up",
        )
        .await;
        let req = ConfigureNetworkRequest {
            interfaces: vec![NetInterface {
                name: "eth0".into(),
                mac: "02:00:00:C8:00:01".into(),
                mtu: 1400,
                addresses: vec!["10.200.1.2/24".into()],
                ..Default::default()
            }],
            routes: vec![NetRoute {
                gateway: "10.200.1.1".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            neighbors: vec![NetNeighbor {
                ip: "10.200.1.1".into(),
                mac: "02:00:00:c8:00:aa".into(),
                device: "eth0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let read_back = "ip -o link show eth0 | grep -o 'mtu [0-9]*\\|state [A-Z]*\\|link/ether [0-9a-f:]*'; \
            ip -o -4 addr show dev eth0 | awk '{print $4}'; ip route show proto static; \
            ip neigh show nud permanent";
        let want = "mtu 1400\nstate UP\nlink/ether 02:00:00:c8:00:01\n10.200.1.2/24\n\
            default via 10.200.1.1 dev eth0\n10.200.1.1 dev eth0 lladdr 02:00:00:c8:00:aa PERMANENT\n";
        let normalise = |s: String| {
            s.lines()
                .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ") + "\n")
                .collect::<String>()
        };

        // A MAC no link has: INVALID_ARGUMENT naming it, and nothing changed.
        let mut bad = req.clone();
        bad.interfaces[0].mac = "02:00:00:c8:00:99".into();
        let msg = expect_code(
            a.client.configure_network(ctx(), &bad).await,
            Code::INVALID_ARGUMENT,
        );
        assert_eq!(
            msg,
            "interface \"eth0\": no link of the guest has MAC 02:00:00:c8:00:99"
        );
        assert_eq!(sh("links0", "ip -o link show | awk '{print $2}'").await, "lo:\npb0@pa0:\npa0@pb0:\n");

        for round in ["first", "again"] {
            a.client
                .configure_network(ctx(), &req)
                .await
                .unwrap_or_else(|e| panic!("{round}: {e:?}"));
        }
        assert_eq!(normalise(sh("read", read_back).await), want);
        a.assert_alive().await;
    })
    .await;
}
