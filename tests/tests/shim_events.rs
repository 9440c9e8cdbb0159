//! The task events `containerd-shim-joey-v2` publishes, as `ctr events` shows them: the exact
//! order of the `/tasks/*` events over a container's life (create, start, an exec, pause,
//! resume, kill, delete), and `/tasks/oom` for a container killed by its memory limit. Each
//! flow runs first with runc (`io.containerd.runc.v2`, the reference) and then with joey in one
//! private containerd (see `joey_tests::containerd`), and joey's events must equal runc's as
//! well as the sequence written down here. Real QEMU, guest kernel and agent. Needs `JOEY_SHIM`,
//! `JOEY_KERNEL`, `JOEY_INITRD` and Debian's containerd, runc, busybox-static. Every test ends
//! with `assert_clean`.

use std::process::Output;
use std::time::{Duration, Instant};

use joey_tests::containerd::*;
use joey_tests::*;

const RUNC: &str = "io.containerd.runc.v2";

/// How long to keep listening after a container's last expected event, so that an extra or
/// late event (one published after the delete, a duplicate) is seen too.
const SETTLE: Duration = Duration::from_secs(1);

/// containerd 1.6 sometimes garbage-collects a freshly imported image's layer snapshot between
/// ctr's "is it unpacked" check and preparing the container snapshot ("parent snapshot … does
/// not exist"), before any shim is involved; ctr unpacks again on the next try.
fn snapshot_race(text: &str) -> bool {
    text.contains("parent snapshot") && text.contains("does not exist")
}

/// `ctr <args>` (a `run`), retried when it hit [`snapshot_race`].
fn ctr_run(c: &Containerd, args: &[&str]) -> Output {
    let mut tries = 0;
    loop {
        let o = c.ctr_out(args);
        tries += 1;
        if o.status.success() || !snapshot_race(&stderr_of(&o)) || tries == 3 {
            return o;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// When a test fails, force-deletes its tasks and containers before containerd goes, so that
/// the shims stop their VMs instead of outliving the test. Declare it after the `Containerd`.
struct OnPanic<'a> {
    c: &'a Containerd,
    ids: &'a [&'a str],
}

impl Drop for OnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for id in self.ids {
                let _ = self.c.ctr_out(&["task", "delete", "--force", id]);
                let _ = self.c.ctr_out(&["container", "rm", id]);
            }
        }
    }
}

/// [`Containerd::assert_ok`], in this file's argument order.
fn ok(o: &Output, what: &str, c: &Containerd) {
    c.assert_ok(o, what);
}

/// The string value of JSON field `name` in a `ctr events` body (`"name":"value"`), if present.
/// `"id"` does not match inside `"container_id"` or `"exec_id"`: the quote before the name is
/// part of the pattern.
fn field(body: &str, name: &str) -> Option<String> {
    let pat = format!("\"{name}\":\"");
    let i = body.find(&pat)? + pat.len();
    let end = body[i..].find('"')?;
    Some(body[i..i + end].to_string())
}

/// One `/tasks/*` event of container `cid`, without what differs between any two runs (pids,
/// times, bundle and I/O paths): the topic, the process it is about (`init` for the container's
/// own process, else the exec id) and, for exit and delete, the exit status. The `id` of a
/// `/tasks/delete` is left out: runc's 1.6 shim leaves it empty while joey names the process
/// (containerd and its CRI plugin do not read it); the exit status still tells which process.
fn render(e: &Event, cid: &str) -> String {
    let mut s = e.topic.clone();
    let process = match e.topic.as_str() {
        "/tasks/delete" => None,
        _ => field(&e.body, "exec_id").or_else(|| field(&e.body, "id")),
    };
    match process.as_deref() {
        Some(p) if p == cid => s += " init",
        Some("") | None => {}
        Some(p) => s += &format!(" {p}"),
    }
    if let Some(st) = e.exit_status() {
        s += &format!(" status={st}");
    }
    s
}

/// The `/tasks/*` events about container `cid` so far, rendered (see [`render`]); the
/// `/containers/*`, `/snapshot/*` and `/images/*` events are left out.
fn task_events(events: &Events, cid: &str) -> Vec<String> {
    events
        .about(cid)
        .iter()
        .filter(|e| e.topic.starts_with("/tasks/"))
        .map(|e| render(e, cid))
        .collect()
}

/// Waits (30 s bound) until the events about `cid` include one that `done` accepts, then
/// [`SETTLE`]s and returns the rendered `/tasks/*` events.
fn task_events_until(c: &Containerd, events: &Events, cid: &str, done: impl Fn(&Event) -> bool) -> Vec<String> {
    let t0 = Instant::now();
    while !events.about(cid).iter().any(&done) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{cid}: the awaited event did not come within 30 s; events so far: {:#?}\ncontainerd log:\n{}",
            events.about(cid),
            c.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(SETTLE);
    task_events(events, cid)
}

/// The life of one detached container on `runtime`: run, a failing exec, pause, resume,
/// SIGKILL, delete, rm. Returns its rendered `/tasks/*` events.
fn life(c: &Containerd, events: &Events, runtime: &str, id: &str) -> Vec<String> {
    let o = ctr_run(c, &["run", "-d", "--runtime", runtime, IMAGE, id, "sleep", "300"]);
    ok(&o, &format!("{runtime}: ctr run -d"), c);
    c.wait_task_status(id, "RUNNING", RUN_TIMEOUT);

    let o = c.ctr_out(&["task", "exec", "--exec-id", "e1", id, "sh", "-c", "exit 4"]);
    assert_eq!(o.status.code(), Some(4), "{runtime}: exec exit code; stderr: {}\n{}", stderr_of(&o), c.log());

    ok(&c.ctr_out(&["task", "pause", id]), &format!("{runtime}: ctr task pause"), c);
    assert_eq!(c.task_status(id).as_deref(), Some("PAUSED"), "{runtime}");
    ok(&c.ctr_out(&["task", "resume", id]), &format!("{runtime}: ctr task resume"), c);
    assert_eq!(c.task_status(id).as_deref(), Some("RUNNING"), "{runtime}");

    ok(&c.ctr_out(&["task", "kill", "-s", "SIGKILL", id]), &format!("{runtime}: ctr task kill"), c);
    c.wait_task_status(id, "STOPPED", RUN_TIMEOUT);
    ok(&c.ctr_out(&["task", "delete", id]), &format!("{runtime}: ctr task delete"), c);
    ok(&c.ctr_out(&["container", "rm", id]), &format!("{runtime}: ctr container rm"), c);

    task_events_until(c, events, id, |e| e.topic == "/containers/delete")
}

/// The `/tasks/*` events of a container's life, in order, are the ones runc gives, and exactly
/// these: the exec's exit carries its status (4), the init's and the delete's carry 137.
#[test]
fn events_in_order() {
    let c = Containerd::start();
    c.import_busybox();
    let events = c.events();
    let _guard = OnPanic { c: &c, ids: &["ev-runc", "ev-joey"] };

    let expected = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exec-added e1",
        "/tasks/exec-started e1",
        "/tasks/exit e1 status=4",
        "/tasks/paused",
        "/tasks/resumed",
        "/tasks/exit init status=137",
        "/tasks/delete status=137",
    ];
    let runc = life(&c, &events, RUNC, "ev-runc");
    assert_eq!(runc, expected, "runc's events differ from the documented sequence");
    let joey = life(&c, &events, RUNTIME, "ev-joey");
    assert_eq!(
        joey,
        runc,
        "joey's /tasks events differ from runc's\njoey's raw events: {:#?}\ncontainerd log:\n{}",
        events.about("ev-joey"),
        c.log()
    );
    drop(events);
    c.assert_clean(&["ev-runc", "ev-joey"]);
}

/// Allocates without bound: the shell doubles a string until the memory cgroup kills it.
const HOG: &[&str] = &["sh", "-c", "x=a; while :; do x=$x$x; done"];

/// `ctr run --memory-limit <32 MiB>` of [`HOG`] on `runtime`. With `rm`: `--rm` in the
/// foreground, ctr's exit code must be 137, and ctr deletes the task as soon as it exits (as the
/// CRI plugin does on a task's exit). Without: `-d`, and the task is deleted [`SETTLE`] after
/// its `/tasks/exit`. Returns the container's rendered `/tasks/*` events once it is removed.
fn oom_run(c: &Containerd, events: &Events, runtime: &str, id: &str, rm: bool) -> Vec<String> {
    let mut args = vec!["run", "--runtime", runtime, "--memory-limit", "33554432"];
    args.push(if rm { "--rm" } else { "-d" });
    args.extend_from_slice(&[IMAGE, id]);
    args.extend_from_slice(HOG);
    let o = ctr_run(c, &args);
    if rm {
        assert_eq!(
            o.status.code(),
            Some(137),
            "{runtime} {id}: exit code of the memory hog; stderr: {}\ncontainerd log:\n{}",
            stderr_of(&o),
            c.log()
        );
    } else {
        ok(&o, &format!("{runtime}: ctr run -d"), c);
        task_events_until(c, events, id, |e| e.topic == "/tasks/exit");
        c.wait_task_status(id, "STOPPED", RUN_TIMEOUT);
        ok(&c.ctr_out(&["task", "delete", id]), &format!("{runtime}: ctr task delete"), c);
        ok(&c.ctr_out(&["container", "rm", id]), &format!("{runtime}: ctr container rm"), c);
    }
    task_events_until(c, events, id, |e| e.topic == "/containers/delete")
}

/// The `/tasks/*` events of `cid` without the create/start before the process ran.
fn after_start(v: &[String]) -> Vec<String> {
    v.iter().filter(|t| *t != "/tasks/create" && *t != "/tasks/start").cloned().collect()
}

/// A container killed by its memory limit exits with 137 and gets one `/tasks/oom` before its
/// `/tasks/exit`, whether its task is deleted at once (`--rm`) or later, as with runc (compared
/// when runc reports the OOM on this host).
#[test]
fn oom_is_reported() {
    let c = Containerd::start();
    c.import_busybox();
    let events = c.events();
    let ids = ["oom-runc", "oom-runc-rm", "oom-joey", "oom-joey-rm"];
    let _guard = OnPanic { c: &c, ids: &ids };

    let runc = [
        ("kept", oom_run(&c, &events, RUNC, "oom-runc", false)),
        ("--rm", oom_run(&c, &events, RUNC, "oom-runc-rm", true)),
    ];
    let joey = [
        ("kept", oom_run(&c, &events, RUNTIME, "oom-joey", false)),
        ("--rm", oom_run(&c, &events, RUNTIME, "oom-joey-rm", true)),
    ];
    eprintln!("runc: {runc:?}\njoey: {joey:?}");
    let expected: Vec<String> = ["/tasks/oom", "/tasks/exit init status=137", "/tasks/delete status=137"]
        .map(String::from)
        .to_vec();
    let joey_after_start: Vec<(&str, Vec<String>)> = joey.iter().map(|(k, v)| (*k, after_start(v))).collect();
    assert_eq!(
        joey_after_start,
        [("kept", expected.clone()), ("--rm", expected)],
        "joey's /tasks events of OOM-killed containers (runc's: {runc:?})\njoey's raw events: {:#?}\n{:#?}\ncontainerd log:\n{}",
        events.about("oom-joey"),
        events.about("oom-joey-rm"),
        c.log()
    );
    if runc.iter().all(|(_, v)| v.iter().any(|t| t == "/tasks/oom")) {
        assert_eq!(joey, runc, "joey's /tasks events differ from runc's");
    } else {
        eprintln!("runc reported no /tasks/oom on this host ({runc:?}): joey's events checked alone");
    }
    drop(events);
    c.assert_clean(&ids);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_without_run_specific_fields() {
        let ev = |topic: &str, body: &str| Event {
            topic: topic.to_string(),
            body: body.to_string(),
        };
        let exit = ev(
            "/tasks/exit",
            r#"{"container_id":"c1","id":"e1","pid":42,"exit_status":4,"exited_at":"2026-11-27T06:00:00Z"}"#,
        );
        assert_eq!(render(&exit, "c1"), "/tasks/exit e1 status=4");
        let exit = ev("/tasks/exit", r#"{"container_id":"c1","id":"c1","pid":7,"exited_at":"x"}"#);
        assert_eq!(render(&exit, "c1"), "/tasks/exit init status=0");
        let added = ev("/tasks/exec-added", r#"{"container_id":"c1","exec_id":"e1"}"#);
        assert_eq!(render(&added, "c1"), "/tasks/exec-added e1");
        let create = ev("/tasks/create", r#"{"container_id":"c1","bundle":"/b","pid":9}"#);
        assert_eq!(render(&create, "c1"), "/tasks/create");
        let delete = ev("/tasks/delete", r#"{"container_id":"c1","pid":7,"exit_status":137,"id":"c1"}"#);
        assert_eq!(render(&delete, "c1"), "/tasks/delete status=137");
        assert_eq!(field(r#"{"container_id":"c1"}"#, "id"), None);
    }
}
