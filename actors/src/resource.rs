//! The resource manager: one interface for everything a sandbox or container sets up on the host
//! or in the guest (a rootfs mount, the container's shares and its guest container, ...).
//!
//! A [`ResourceStack`] sets resources up in order and cleans them up in reverse order; when a
//! setup fails, what was already set up is cleaned up before the error is returned, so a failed
//! request leaves nothing behind. Setup and cleanup are futures (blocking work inside them goes
//! to `spawn_blocking`); cleanup errors are collected, never stop the remaining cleanups.

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("setting up {name}: {reason}")]
    Setup { name: String, reason: String },
}

/// One resource.
pub trait Resource: Send {
    /// For messages, e.g. "rootfs mount /run/.../rootfs".
    fn name(&self) -> String;
    /// Sets it up. On error nothing of it may be left (the stack does not clean it up).
    fn setup(&mut self) -> BoxFuture<'_, Result<(), String>>;
    /// Releases it (bounded in time).
    fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), String>>;
}

/// Resources set up in order, cleaned up in reverse order.
#[derive(Default)]
pub struct ResourceStack {
    done: Vec<Box<dyn Resource>>,
}

impl ResourceStack {
    /// Sets `r` up and records it; on failure cleans up everything recorded so far (reverse
    /// order) and returns the setup error.
    pub async fn add(&mut self, mut r: Box<dyn Resource>) -> Result<(), ResourceError> {
        match r.setup().await {
            Ok(()) => {
                self.done.push(r);
                Ok(())
            }
            Err(reason) => {
                let errors = self.cleanup_all().await;
                if !errors.is_empty() {
                    tracing::warn!(?errors, "cleanup after a failed setup was incomplete");
                }
                Err(ResourceError::Setup { name: r.name(), reason })
            }
        }
    }

    /// Records a resource that was set up elsewhere (e.g. by an agent call that also started
    /// the process), so that it is cleaned up with the others.
    pub fn push_ready(&mut self, r: Box<dyn Resource>) {
        self.done.push(r);
    }

    /// Cleans everything up, last first; returns the failures.
    pub async fn cleanup_all(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        while let Some(r) = self.done.pop() {
            let name = r.name();
            if let Err(e) = r.cleanup().await {
                tracing::warn!(resource = %name, error = %e, "cleanup failed");
                errors.push(format!("{name}: {e}"));
            }
        }
        errors
    }

    /// Names of the resources held, in setup order.
    pub fn names(&self) -> Vec<String> {
        self.done.iter().map(|r| r.name()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.done.is_empty()
    }
}

impl Drop for ResourceStack {
    fn drop(&mut self) {
        if !self.done.is_empty() {
            // Cleanup is async: it cannot run here. Owners call `cleanup_all` first.
            tracing::warn!(resources = ?self.names(), "resource stack dropped without cleanup");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    struct Probe {
        name: &'static str,
        fail_setup: bool,
        fail_cleanup: bool,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl Resource for Probe {
        fn name(&self) -> String {
            self.name.to_string()
        }
        fn setup(&mut self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async move {
                self.log.lock().unwrap().push(format!("setup {}", self.name));
                if self.fail_setup {
                    Err("boom".into())
                } else {
                    Ok(())
                }
            })
        }
        fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
            Box::pin(async move {
                self.log.lock().unwrap().push(format!("cleanup {}", self.name));
                if self.fail_cleanup {
                    Err("stuck".into())
                } else {
                    Ok(())
                }
            })
        }
    }

    fn probe(name: &'static str, log: &Arc<Mutex<Vec<String>>>, fail_setup: bool, fail_cleanup: bool) -> Box<Probe> {
        Box::new(Probe {
            name,
            fail_setup,
            fail_cleanup,
            log: log.clone(),
        })
    }

    #[tokio::test]
    async fn cleanup_is_reverse_order_and_collects_errors() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut s = ResourceStack::default();
        s.add(probe("a", &log, false, false)).await.unwrap();
        s.add(probe("b", &log, false, true)).await.unwrap();
        s.push_ready(probe("c", &log, false, false));
        assert_eq!(s.names(), vec!["a", "b", "c"]);
        let errors = s.cleanup_all().await;
        assert_eq!(errors, vec!["b: stuck".to_string()]);
        assert!(s.is_empty());
        assert_eq!(
            *log.lock().unwrap(),
            vec!["setup a", "setup b", "cleanup c", "cleanup b", "cleanup a"]
        );
    }

    #[tokio::test]
    async fn failed_setup_undoes_what_was_set_up() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut s = ResourceStack::default();
        s.add(probe("a", &log, false, false)).await.unwrap();
        s.add(probe("b", &log, false, false)).await.unwrap();
        let e = s.add(probe("c", &log, true, false)).await.unwrap_err();
        assert_eq!(e.to_string(), "setting up c: boom");
        assert!(s.is_empty());
        assert_eq!(
            *log.lock().unwrap(),
            vec!["setup a", "setup b", "setup c", "cleanup b", "cleanup a"]
        );
    }
}
