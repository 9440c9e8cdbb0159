//! Waiting for termination signals in async code (tokio's signal driver).

use tokio::signal::unix::{signal, SignalKind};

async fn one(kind: SignalKind) {
    match signal(kind) {
        Ok(mut s) => {
            s.recv().await;
        }
        // Without a handler the default action applies; never resolve.
        Err(_) => std::future::pending::<()>().await,
    }
}

/// Resolves on the first SIGINT, SIGTERM or (if `hup`) SIGHUP with the shell-style exit code
/// for it (130, 143, 129).
pub async fn first_termination_signal(hup: bool) -> i32 {
    let hangup = async {
        if hup {
            one(SignalKind::hangup()).await
        } else {
            std::future::pending::<()>().await
        }
    };
    tokio::select! {
        _ = one(SignalKind::interrupt()) => 130,
        _ = one(SignalKind::terminate()) => 143,
        _ = hangup => 129,
    }
}
