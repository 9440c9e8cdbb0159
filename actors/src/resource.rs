//! The resource manager: one interface for everything a sandbox or container sets up on the host
//! or in the guest (a rootfs mount, the container's shares and its guest container, ...).
//!
//! A [`ResourceStack`] sets resources up in order and cleans them up in reverse order; when a
//! setup fails, what was already set up is cleaned up before the error is returned, so a failed
//! request leaves nothing behind. Setup and cleanup are futures (blocking work inside them goes
//! to `spawn_blocking`); cleanup errors are collected, never stop the remaining cleanups.
//!
//! Host work that is blocking by nature (mkdir, mount, a device thread to stop and join) is
//! staged with [`ResourceStack::add_blocking`]: the step runs on the blocking pool, keeps its
//! own typed error, and on success returns an [`Undo`] whose blocking cleanup also runs on the
//! blocking pool. A stack dropped with resources left only hands their cleanup to the tokio
//! runtime (never blocks, never waits).

use std::future::Future;
use std::pin::Pin;

/// A boxed, sendable future.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error("setting up {name}: {reason}")]
    Setup { name: String, reason: String },
    /// A blocking setup or cleanup step did not complete (it panicked, or the runtime is
    /// shutting down).
    #[error("blocking task failed: {0}")]
    Task(String),
}

/// A blocking cleanup closure (see [`Undo`]).
pub type UndoFn = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// A resource whose setup is already done (by a blocking step, see
/// [`ResourceStack::add_blocking`]) and whose cleanup is blocking work, run on `spawn_blocking`
/// (each such cleanup bounds its own time).
pub struct Undo {
    name: String,
    undo: UndoFn,
}

impl Undo {
    pub fn new(name: String, undo: impl FnOnce() -> Result<(), String> + Send + 'static) -> Box<Undo> {
        Box::new(Undo {
            name,
            undo: Box::new(undo),
        })
    }
}

impl Resource for Undo {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn setup(&mut self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
        Box::pin(async move {
            tokio::task::spawn_blocking(self.undo)
                .await
                .unwrap_or_else(|e| Err(ResourceError::Task(e.to_string()).to_string()))
        })
    }
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
                self.undo_after_failure().await;
                Err(ResourceError::Setup { name: r.name(), reason })
            }
        }
    }

    async fn undo_after_failure(&mut self) {
        let errors = self.cleanup_all().await;
        if !errors.is_empty() {
            tracing::warn!(?errors, "cleanup after a failed setup was incomplete");
        }
    }

    /// Runs the blocking `setup` step on the blocking pool; it returns a value and the resource
    /// that undoes it, which is recorded. When the step fails, everything recorded so far is
    /// cleaned up (reverse order) and the step's own error is returned; the step itself must
    /// leave nothing behind on error.
    pub async fn add_blocking<T, E>(
        &mut self,
        setup: impl FnOnce() -> Result<(T, Box<dyn Resource>), E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<ResourceError> + Send + 'static,
    {
        let r = tokio::task::spawn_blocking(setup)
            .await
            .unwrap_or_else(|e| Err(ResourceError::Task(e.to_string()).into()));
        match r {
            Ok((value, res)) => {
                self.done.push(res);
                Ok(value)
            }
            Err(e) => {
                self.undo_after_failure().await;
                Err(e)
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
        if self.done.is_empty() {
            return;
        }
        // Owners call `cleanup_all` first. Cleanup is async and must not block here: hand it to
        // the runtime, if there is one.
        tracing::warn!(resources = ?self.names(), "resource stack dropped without cleanup");
        let mut rest = ResourceStack {
            done: std::mem::take(&mut self.done),
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    rest.cleanup_all().await;
                });
            }
            Err(_) => {
                tracing::error!(resources = ?rest.names(), "no runtime to clean up on; resources left behind");
                // Only their own `Drop`s run (which signal, never wait).
                drop(std::mem::take(&mut rest.done));
            }
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

    impl Probe {
        /// Logs `<what> <name>`; fails with `error` if asked to.
        fn record(&self, what: &str, fail: bool, error: &str) -> Result<(), String> {
            self.log.lock().unwrap().push(format!("{what} {}", self.name));
            if fail {
                Err(error.into())
            } else {
                Ok(())
            }
        }
    }

    impl Resource for Probe {
        fn name(&self) -> String {
            self.name.to_string()
        }
        fn setup(&mut self) -> BoxFuture<'_, Result<(), String>> {
            Box::pin(async move { self.record("setup", self.fail_setup, "boom") })
        }
        fn cleanup(self: Box<Self>) -> BoxFuture<'static, Result<(), String>> {
            Box::pin(async move { self.record("cleanup", self.fail_cleanup, "stuck") })
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

    #[derive(Debug, PartialEq)]
    enum StepError {
        Refused(&'static str),
        Resource(String),
    }

    impl From<ResourceError> for StepError {
        fn from(e: ResourceError) -> Self {
            StepError::Resource(e.to_string())
        }
    }

    fn undo(name: &'static str, log: &Arc<Mutex<Vec<String>>>) -> Box<dyn Resource> {
        let log = log.clone();
        Undo::new(name.to_string(), move || {
            log.lock().unwrap().push(format!("undo {name}"));
            Ok(())
        })
    }

    #[tokio::test]
    async fn blocking_steps_keep_their_value_and_typed_error() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut s = ResourceStack::default();
        let l = log.clone();
        let v = s
            .add_blocking(move || Ok::<_, StepError>((7, undo("a", &l))))
            .await
            .unwrap();
        assert_eq!(v, 7);
        let l = log.clone();
        s.add_blocking(move || Ok::<_, StepError>(((), undo("b", &l))))
            .await
            .unwrap();
        let e = s
            .add_blocking(|| Err::<((), Box<dyn Resource>), _>(StepError::Refused("no")))
            .await
            .unwrap_err();
        assert_eq!(e, StepError::Refused("no"));
        assert!(s.is_empty());
        assert_eq!(*log.lock().unwrap(), vec!["undo b", "undo a"]);
        // A step that panics is a typed error too, and undoes nothing it did not record.
        let e = s
            .add_blocking(|| -> Result<((), Box<dyn Resource>), StepError> { panic!("step") })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, StepError::Resource(m) if m.starts_with("blocking task failed")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn a_dropped_stack_is_cleaned_up_by_the_runtime() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut s = ResourceStack::default();
        s.push_ready(undo("a", &log));
        s.push_ready(undo("b", &log));
        drop(s);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while log.lock().unwrap().len() < 2 {
            assert!(
                std::time::Instant::now() < deadline,
                "not cleaned up: {:?}",
                log.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert_eq!(*log.lock().unwrap(), vec!["undo b", "undo a"]);
    }
}
