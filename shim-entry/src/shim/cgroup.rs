//! cgroup v2 conversions: the agent's container figures as containerd's cgroup v2 `Metrics`
//! (Stats), and OCI LinuxResources JSON for Update.

use containerd_shim::protos::api;
use containerd_shim::protos::cgroups_v2::metrics as cg2;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message as _, MessageField};
use joey_actors::container::{Stats, Update};
use joey_agent_protocol::agent;

use super::service::{ask, Inner, TaskError};

/// containerd's type URL of cgroup v2 metrics (what `ctr task metrics` decodes).
pub const CGROUPS_V2_METRICS_URL: &str = "io.containerd.cgroups.v2.Metrics";

/// cgroup v2 metrics in containerd's format from the agent's figures.
pub fn v2_metrics(s: &agent::ContainerStats) -> cg2::Metrics {
    let stat = |k: &str| s.memory_stat.get(k).copied().unwrap_or(0);
    cg2::Metrics {
        pids: MessageField::some(cg2::PidsStat {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(cg2::CPUStat {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        }),
        memory: MessageField::some(cg2::MemoryStat {
            anon: stat("anon"),
            file: stat("file"),
            kernel_stack: stat("kernel_stack"),
            slab: stat("slab"),
            sock: stat("sock"),
            shmem: stat("shmem"),
            file_mapped: stat("file_mapped"),
            file_dirty: stat("file_dirty"),
            file_writeback: stat("file_writeback"),
            anon_thp: stat("anon_thp"),
            inactive_anon: stat("inactive_anon"),
            active_anon: stat("active_anon"),
            inactive_file: stat("inactive_file"),
            active_file: stat("active_file"),
            unevictable: stat("unevictable"),
            slab_reclaimable: stat("slab_reclaimable"),
            slab_unreclaimable: stat("slab_unreclaimable"),
            pgfault: stat("pgfault"),
            pgmajfault: stat("pgmajfault"),
            workingset_refault: stat("workingset_refault"),
            workingset_activate: stat("workingset_activate"),
            workingset_nodereclaim: stat("workingset_nodereclaim"),
            pgrefill: stat("pgrefill"),
            pgscan: stat("pgscan"),
            pgsteal: stat("pgsteal"),
            pgactivate: stat("pgactivate"),
            pgdeactivate: stat("pgdeactivate"),
            pglazyfree: stat("pglazyfree"),
            pglazyfreed: stat("pglazyfreed"),
            thp_fault_alloc: stat("thp_fault_alloc"),
            thp_collapse_alloc: stat("thp_collapse_alloc"),
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            swap_usage: s.memory_swap_usage_bytes,
            swap_limit: s.memory_swap_limit_bytes,
            ..Default::default()
        }),
        memory_events: MessageField::some(cg2::MemoryEvents {
            low: s.memory_events_low,
            high: s.memory_events_high,
            max: s.memory_events_max,
            oom: s.memory_events_oom,
            oom_kill: s.memory_events_oom_kill,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The OCI LinuxResources JSON of an Update request (containerd sends it as the `Any`'s value).
pub fn resources_json(id: &str, resources: Option<&Any>) -> Result<String, TaskError> {
    let any = resources.ok_or_else(|| TaskError::InvalidArgument(format!("update of {id}: no resources")))?;
    let v: serde_json::Value = serde_json::from_slice(&any.value).map_err(|e| {
        TaskError::InvalidArgument(format!(
            "update of {id}: resources are not OCI LinuxResources JSON: {e}"
        ))
    })?;
    Ok(v.to_string())
}

impl Inner {
    pub(super) async fn stats(&self, req: api::StatsRequest) -> Result<api::StatsResponse, TaskError> {
        let c = self.containers.get(&req.id)?;
        let s = ask(&c, Stats).await??;
        let value = v2_metrics(&s)
            .write_to_bytes()
            .map_err(|e| TaskError::Internal(format!("encode metrics: {e}")))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: CGROUPS_V2_METRICS_URL.to_string(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    pub(super) async fn update(&self, req: api::UpdateTaskRequest) -> Result<(), TaskError> {
        let c = self.containers.get(&req.id)?;
        let resources_json = resources_json(&req.id, req.resources.as_ref())?;
        Ok(ask(&c, Update { resources_json }).await??)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_become_cgroup_v2_metrics() {
        let mut s = agent::ContainerStats {
            cpu_usage_usec: 1500,
            cpu_user_usec: 1000,
            cpu_system_usec: 500,
            memory_usage_bytes: 4096,
            memory_limit_bytes: 1 << 20,
            pids_current: 2,
            pids_limit: 100,
            memory_events_oom_kill: 1,
            ..Default::default()
        };
        s.memory_stat.insert("anon".into(), 8192);
        let m = v2_metrics(&s);
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!(m.cpu.user_usec, 1000);
        assert_eq!(m.cpu.system_usec, 500);
        assert_eq!(m.memory.usage, 4096);
        assert_eq!(m.memory.usage_limit, 1 << 20);
        assert_eq!(m.memory.anon, 8192);
        assert_eq!(m.memory.file, 0);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.pids.limit, 100);
        assert_eq!(m.memory_events.oom_kill, 1);
        // Round trip through the wire format containerd decodes.
        let bytes = m.write_to_bytes().unwrap();
        let back = cg2::Metrics::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn update_resources_must_be_json() {
        assert!(resources_json("c", None)
            .unwrap_err()
            .to_string()
            .contains("no resources"));
        let bad = Any {
            value: b"{".to_vec(),
            ..Default::default()
        };
        let e = resources_json("c", Some(&bad)).unwrap_err();
        assert!(matches!(e, TaskError::InvalidArgument(_)), "{e}");
        let good = Any {
            value: br#"{"memory": {"limit": 1048576}}"#.to_vec(),
            ..Default::default()
        };
        assert_eq!(
            resources_json("c", Some(&good)).unwrap(),
            r#"{"memory":{"limit":1048576}}"#
        );
    }
}
