//! The network RPC: ConfigureNetwork (the pod's interfaces, routes and neighbours in the
//! guest's network namespace; `crate::network` does the work).

use std::time::Duration;

use joey_agent_protocol::agent::{ConfigureNetworkRequest, Empty};

use super::{Agent, Result, ServiceError};
use crate::network;

/// The longest a ConfigureNetwork may take (netlink answers at once; this bounds a stuck
/// kernel request).
const CONFIGURE_TIMEOUT: Duration = Duration::from_secs(10);

impl Agent {
    /// ConfigureNetwork: checked whole, then applied; one at a time.
    pub(super) async fn configure_network(&self, req: ConfigureNetworkRequest) -> Result<Empty> {
        let _serial = self.network_lock.lock().await;
        // The socket is opened by this thread, which is in the agent's (the guest's root)
        // network namespace like every agent thread.
        let handle = network::connect()?;
        tokio::time::timeout(CONFIGURE_TIMEOUT, network::configure(&handle, &req))
            .await
            .map_err(|_| {
                ServiceError::Internal(format!(
                    "ConfigureNetwork took longer than {CONFIGURE_TIMEOUT:?}"
                ))
            })??;
        agent_log!(
            "network configured: {} interfaces, {} routes, {} neighbours",
            req.interfaces.len(),
            req.routes.len(),
            req.neighbors.len()
        );
        Ok(Empty::default())
    }
}
