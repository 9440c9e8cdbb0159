//! The container RPCs: CreateContainer, RemoveContainer, PauseContainer, ResumeContainer,
//! UpdateContainer, StatsContainer, ListPids and GetOomEvent.
//!
//! A container's first process is served under exec id = container id (see `process.rs`); the
//! service keeps a [`ContainerRecord`] per container until RemoveContainer. OOM kills are found
//! by a watcher that polls every container's `memory.events` every [`OOM_POLL`]; each kill is
//! reported once, either as an OOM event (GetOomEvent) or with the first process's exit
//! (WaitProcess), whichever sees it first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use joey_agent_protocol::agent::{
    ContainerRequest, ContainerStats, CreateContainerRequest, CreateContainerResponse, Empty,
    ListPidsResponse, OomEvent, UpdateContainerRequest,
};
use joey_agent_protocol::GUEST_SHARED_DIR;

use super::{blocking, Agent, Result, ServiceError, ShutdownMode};
use crate::cgroup::{self, Cgroup};
use crate::container::{self, ContainerError};
use crate::process::Process;
use crate::reaper::ReaperError;
use crate::seccomp::Filter;
use crate::spec::{self, FlatContainer};

/// Bound on PauseContainer/ResumeContainer waiting for `cgroup.events`.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on RemoveContainer waiting for the container's cgroup to empty.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the OOM watcher reads every container's `memory.events`.
const OOM_POLL: Duration = Duration::from_millis(200);
/// OOM events kept while nobody polls (the oldest are dropped beyond this).
pub const MAX_OOM_EVENTS: usize = 64;

/// What the service keeps about a container until RemoveContainer.
pub(super) struct ContainerRecord {
    pub(super) init_pid: i32,
    pub(super) cgroup: Option<Cgroup>,
    pub(super) seccomp: Option<Filter>,
    /// Its first process (also in `procs` under the container id, until evicted).
    pub(super) process: Arc<Process>,
    /// Frozen by PauseContainer (an exec would be frozen before it could exec).
    pub(super) paused: bool,
    /// The cgroup's oom_kill count already reported (GetOomEvent or WaitProcess).
    oom_reported: u64,
    /// Whether the first process's exit carried OOM kills (decided at its first WaitProcess).
    oom_at_exit: Option<bool>,
}

impl ContainerRecord {
    /// How many of its `count` OOM kills nobody reported yet; records them as reported.
    fn take_new_ooms(&mut self, count: u64) -> u64 {
        let new = count.saturating_sub(self.oom_reported);
        self.oom_reported = self.oom_reported.max(count);
        new
    }

    /// Whether its first process has not exited.
    pub(super) fn running(&self) -> bool {
        self.process.exit_info().is_none()
    }
}

/// Container ids whose oom_kill count grew, oldest first (at most [`MAX_OOM_EVENTS`]), each
/// with its 1-based sequence number.
#[derive(Default)]
pub(super) struct OomEvents {
    queue: Mutex<OomQueue>,
    notify: tokio::sync::Notify,
}

#[derive(Default)]
struct OomQueue {
    events: VecDeque<(u64, String)>,
    /// Events queued so far (the last one's sequence number), dropped ones included.
    pushed: u64,
}

impl OomEvents {
    fn push(&self, id: &str) {
        {
            let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            if q.events.len() >= MAX_OOM_EVENTS {
                q.events.pop_front();
            }
            q.pushed += 1;
            let seq = q.pushed;
            q.events.push_back((seq, id.to_string()));
        }
        self.notify.notify_one();
    }

    /// How many events were queued so far (the last one's sequence number).
    pub(super) fn pushed(&self) -> u64 {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).pushed
    }

    /// The oldest event and its sequence number, waiting for one if there is none.
    async fn next(&self) -> (String, u64) {
        loop {
            if let Some((seq, id)) = self
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .events
                .pop_front()
            {
                return (id, seq);
            }
            // notify_one stores a permit when nobody waits: an event pushed between the check
            // above and this await is not missed.
            self.notify.notified().await;
        }
    }
}

impl Agent {
    /// The container's cgroup, or the error for an unknown container or one without a group.
    fn cgroup_of(&self, id: &str) -> Result<Cgroup> {
        let c = self.containers();
        let rec = c
            .get(id)
            .ok_or_else(|| ServiceError::UnknownContainer(id.to_string()))?;
        rec.cgroup
            .clone()
            .ok_or_else(|| ServiceError::NoCgroup(id.to_string()))
    }

    /// CreateContainer: starts a container (its process is served under exec id = container
    /// id).
    pub(super) async fn create(
        &self,
        req: CreateContainerRequest,
    ) -> Result<CreateContainerResponse> {
        container::validate_id(&req.container_id)?;
        let _serial = self.exec_lock.lock().await;
        if self.procs().contains_key(&req.container_id)
            || self.containers().contains_key(&req.container_id)
        {
            return Err(ServiceError::AlreadyExists(req.container_id));
        }
        let id = req.container_id.clone();
        let config = if req.oci_spec_json.is_empty() {
            spec::from_flat(FlatContainer {
                id: req.container_id,
                rootfs: req.rootfs,
                argv: req.argv,
                env: req.env,
                cwd: req.cwd,
                terminal: req.terminal,
                hostname: req.hostname,
                readonly_rootfs: req.readonly_rootfs,
            })
        } else {
            spec::from_oci_json(&req.container_id, &req.oci_spec_json, GUEST_SHARED_DIR)
                .map_err(ContainerError::from)?
        };
        let table = self.table.clone();
        // Only PID 1 in the guest has the virtio-fs share to mount.
        let mount_shared = self.shutdown == ShutdownMode::Reboot;
        let cgroup_root = self.cgroup_root.clone();
        let (config, started) = blocking("container", move || {
            let started = container::spawn(
                table,
                &config,
                GUEST_SHARED_DIR,
                mount_shared,
                cgroup_root.as_deref(),
            );
            (config, started)
        })
        .await?;
        let started = started?;
        let cgroup = started.cgroup;
        let r = match self.register(
            id.clone(),
            started.spawned,
            config.process.terminal,
            &config.process.args,
            "container",
        ) {
            Ok(r) => r,
            Err(e) => {
                // register killed the process; do not leave its group behind.
                if let Some(cg) = cgroup {
                    match blocking("cgroup", move || cg.kill_and_remove(REMOVE_TIMEOUT)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(ce)) => agent_log!("container {id}: removing its cgroup: {ce}"),
                        Err(je) => agent_log!("container {id}: removing its cgroup: {je}"),
                    }
                }
                return Err(e);
            }
        };
        let process = self.get(&id)?;
        self.containers().insert(
            id,
            ContainerRecord {
                init_pid: r.pid as i32,
                cgroup,
                seccomp: config.seccomp,
                process,
                paused: false,
                oom_reported: 0,
                oom_at_exit: None,
            },
        );
        Ok(CreateContainerResponse {
            pid: r.pid,
            ..Default::default()
        })
    }

    /// PauseContainer.
    pub(super) async fn pause(&self, req: ContainerRequest) -> Result<Empty> {
        self.set_frozen(&req.container_id, true).await
    }

    /// ResumeContainer.
    pub(super) async fn resume(&self, req: ContainerRequest) -> Result<Empty> {
        self.set_frozen(&req.container_id, false).await
    }

    async fn set_frozen(&self, id: &str, frozen: bool) -> Result<Empty> {
        let cg = self.cgroup_of(id)?;
        // Marked before freezing (no exec may start into a freezing group), cleared after a
        // thaw; a failed freeze leaves it marked, as the group may be partly frozen.
        if frozen {
            self.set_paused(id, true);
        }
        blocking("cgroup", move || cg.set_frozen(frozen, FREEZE_TIMEOUT)).await??;
        if !frozen {
            self.set_paused(id, false);
        }
        Ok(Empty::default())
    }

    fn set_paused(&self, id: &str, paused: bool) {
        if let Some(r) = self.containers().get_mut(id) {
            r.paused = paused;
        }
    }

    /// StatsContainer.
    pub(super) async fn stats(&self, req: ContainerRequest) -> Result<ContainerStats> {
        let cg = self.cgroup_of(&req.container_id)?;
        blocking("cgroup", move || cg.stats()).await
    }

    /// UpdateContainer.
    pub(super) async fn update(&self, req: UpdateContainerRequest) -> Result<Empty> {
        let cg = self.cgroup_of(&req.container_id)?;
        let r = cgroup::parse_resources(&req.resources_json)?;
        cgroup::resource_writes(&r)?;
        blocking("cgroup", move || cg.apply(&r)).await??;
        Ok(Empty::default())
    }

    /// ListPids.
    pub(super) async fn list_pids(&self, req: ContainerRequest) -> Result<ListPidsResponse> {
        let cg = self.cgroup_of(&req.container_id)?;
        let pids = blocking("cgroup", move || cg.procs()).await??;
        Ok(ListPidsResponse {
            pids,
            ..Default::default()
        })
    }

    /// RemoveContainer: kills what is left of the container and forgets it.
    pub(super) async fn remove(&self, req: ContainerRequest) -> Result<Empty> {
        let id = req.container_id.as_str();
        let (cgroup, process, init_pid) = {
            let c = self.containers();
            let rec = c
                .get(id)
                .ok_or_else(|| ServiceError::UnknownContainer(id.to_string()))?;
            (rec.cgroup.clone(), rec.process.clone(), rec.init_pid)
        };
        match cgroup {
            Some(cg) => blocking("cgroup", move || cg.kill_and_remove(REMOVE_TIMEOUT)).await??,
            None => {
                if process.exit_info().is_none() {
                    // Killing pid 1 of its namespace kills the rest of it.
                    match self.table.kill(init_pid, libc::SIGKILL) {
                        Ok(()) | Err(ReaperError::AlreadyExited) => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        self.containers().remove(id);
        agent_log!("container {id}: removed");
        Ok(Empty::default())
    }

    /// The cgroups of every live container (first process running), for GetGuestMetrics.
    pub(super) fn container_groups(&self) -> Vec<(String, Cgroup)> {
        self.containers()
            .iter()
            .filter(|(_, r)| r.running())
            .filter_map(|(id, r)| r.cgroup.clone().map(|c| (id.clone(), c)))
            .collect()
    }

    /// Starts the task that turns growing `oom_kill` counts into OOM events. Must run inside
    /// the runtime.
    pub fn start_oom_watcher(self: &Arc<Self>) {
        let agent = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(OOM_POLL).await;
                let Some(agent) = agent.upgrade() else { return };
                let groups: Vec<(String, Cgroup)> = agent
                    .containers()
                    .iter()
                    .filter_map(|(id, r)| r.cgroup.clone().map(|c| (id.clone(), c)))
                    .collect();
                if groups.is_empty() {
                    continue;
                }
                let counts = match tokio::task::spawn_blocking(move || {
                    groups
                        .into_iter()
                        .map(|(id, c)| (id, c.oom_kills()))
                        .collect::<Vec<_>>()
                })
                .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        agent_log!("oom watcher: {e}");
                        continue;
                    }
                };
                for (id, n) in counts {
                    agent.queue_new_ooms(&id, n);
                }
            }
        });
    }

    /// Queues an OOM event for each of a container's `count` OOM kills nobody reported yet,
    /// under the lock [`Agent::take_new_ooms`] takes: once WaitProcess finds the kills taken,
    /// their events are queued, and its `oom_events` counts them.
    fn queue_new_ooms(&self, id: &str, count: u64) {
        let mut containers = self.containers();
        let new = containers.get_mut(id).map_or(0, |r| r.take_new_ooms(count));
        for _ in 0..new {
            agent_log!("container {id}: OOM kill");
            self.oom_events.push(id);
        }
    }

    /// How many of a container's `count` OOM kills nobody reported yet; records them as
    /// reported. One lock, so the watcher and WaitProcess never report the same kill twice.
    fn take_new_ooms(&self, id: &str, count: u64) -> u64 {
        self.containers()
            .get_mut(id)
            .map_or(0, |r| r.take_new_ooms(count))
    }

    /// For a container's first process that exited: whether OOM kills happened that nobody
    /// reported (then they count as reported by this exit). The same answer on every call.
    pub(super) async fn oom_at_exit(&self, exec_id: &str, p: &Arc<Process>) -> bool {
        let cgroup = match self.containers().get(exec_id) {
            Some(r) if Arc::ptr_eq(&r.process, p) => match r.oom_at_exit {
                Some(v) => return v,
                None => r.cgroup.clone(),
            },
            _ => return false,
        };
        let count = match cgroup {
            Some(cg) => tokio::task::spawn_blocking(move || cg.oom_kills())
                .await
                .unwrap_or(0),
            None => 0,
        };
        let new = self.take_new_ooms(exec_id, count) > 0;
        match self.containers().get_mut(exec_id) {
            Some(r) => *r.oom_at_exit.get_or_insert(new),
            None => new,
        }
    }

    /// GetOomEvent: the oldest unreported OOM event, waiting for one.
    pub(super) async fn next_oom_event(&self, _: Empty) -> Result<OomEvent> {
        let (container_id, seq) = self.oom_events.next().await;
        Ok(OomEvent {
            container_id,
            seq,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn oom_events_are_bounded_and_wait_for_the_next_one() {
        let ev = Arc::new(OomEvents::default());
        for i in 0..MAX_OOM_EVENTS + 2 {
            ev.push(&format!("c{i}"));
        }
        // The two oldest were dropped; sequence numbers count them.
        assert_eq!(ev.pushed(), MAX_OOM_EVENTS as u64 + 2);
        assert_eq!(ev.next().await, ("c2".to_string(), 3));
        for _ in 3..MAX_OOM_EVENTS + 2 {
            ev.next().await;
        }
        let waiter = tokio::spawn({
            let ev = ev.clone();
            async move { ev.next().await }
        });
        ev.push("late");
        let got = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken within 5 s")
            .expect("task");
        assert_eq!(got, ("late".to_string(), MAX_OOM_EVENTS as u64 + 3));
        assert_eq!(ev.pushed(), MAX_OOM_EVENTS as u64 + 3);
    }
}
