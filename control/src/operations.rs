//! Long-running actions as operations a client can poll or wait on. They run on a bounded
//! pool: at most [`POOL`] at a time, the others `pending` until one ends. Waiters are woken by
//! a watch channel bumped at every change: no thread waits per waiter.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock;
use tokio::sync::{watch, Semaphore};
use uuid::Uuid;

use crate::lifecycle::Action;

const KEEP: usize = 1024;

/// How many operations run at once.
pub const POOL: usize = 32;

/// Operation states (API.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OperationState {
    /// Waiting for room in the pool.
    Pending,
    /// Under way.
    Running,
    /// Done.
    Succeeded,
    /// Ended with an error.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl OperationState {
    /// Every state.
    pub const ALL: [OperationState; 5] = [
        Self::Pending,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Cancelled,
    ];

    /// The state's name (`pending`, `running`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    /// True once the operation has ended.
    pub const fn is_done(self) -> bool {
        !matches!(self, Self::Pending | Self::Running)
    }
}

/// One operation: an action on an instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation {
    /// UUID.
    pub id: Uuid,
    /// What it does.
    pub action: Action,
    /// The instance it acts on.
    pub instance: Uuid,
    /// State.
    pub state: OperationState,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// What went wrong.
    pub error: Option<String>,
    /// What a user should know of an operation that succeeded (a stop that had to be
    /// forced).
    pub detail: Option<String>,
}

/// Recent operations and the pool they run on.
pub struct Operations {
    ops: Mutex<VecDeque<Operation>>,
    /// Bumped at every change.
    changed: watch::Sender<u64>,
    pool: Arc<Semaphore>,
}

impl Default for Operations {
    fn default() -> Self {
        Self {
            ops: Mutex::default(),
            changed: watch::channel(0).0,
            pool: Arc::new(Semaphore::new(POOL)),
        }
    }
}

impl Operations {
    /// Records a new pending operation.
    pub(crate) fn begin(&self, action: Action, instance: Uuid) -> Operation {
        let now = crate::model::now();
        let op = Operation {
            id: Uuid::new_v4(),
            action,
            instance,
            state: OperationState::Pending,
            created_at: now.clone(),
            updated_at: now,
            error: None,
            detail: None,
        };
        self.update(|ops| {
            ops.push_back(op.clone());
            if ops.len() > KEEP {
                ops.pop_front();
            }
        });
        op
    }

    /// Runs `work` for the operation `id` on `runtime` once the pool has room; `done` is
    /// called with its result after the operation is marked ended.
    pub(crate) fn run(
        self: &Arc<Self>,
        runtime: &tokio::runtime::Handle,
        id: Uuid,
        work: impl Future<Output = Result<(), String>> + Send + 'static,
        done: impl FnOnce(Result<(), String>) + Send + 'static,
    ) {
        let ops = self.clone();
        runtime.spawn(async move {
            let Ok(_permit) = ops.pool.clone().acquire_owned().await else {
                return;
            };
            ops.set(id, |op| op.state = OperationState::Running);
            let result = work.await;
            ops.set(id, |op| match &result {
                Ok(()) => op.state = OperationState::Succeeded,
                Err(e) => {
                    op.state = OperationState::Failed;
                    op.error = Some(e.clone());
                }
            });
            done(result);
        });
    }

    fn update(&self, f: impl FnOnce(&mut VecDeque<Operation>)) {
        f(&mut lock(&self.ops));
        // After the lock is released: waiters look at the operations while they hold the
        // watch's value.
        self.changed.send_modify(|n| *n += 1);
    }

    fn set(&self, id: Uuid, f: impl FnOnce(&mut Operation)) {
        self.update(|ops| {
            if let Some(op) = ops.iter_mut().find(|o| o.id == id) {
                f(op);
                op.updated_at = crate::model::now();
            }
        });
    }

    /// Records what a user should know of the operation `id` (see [`Operation::detail`]).
    pub(crate) fn note(&self, id: Uuid, detail: String) {
        self.set(id, |op| op.detail = Some(detail));
    }

    /// One operation.
    pub fn get(&self, id: Uuid) -> Option<Operation> {
        lock(&self.ops).iter().find(|o| o.id == id).cloned()
    }

    /// All kept operations, oldest first.
    pub fn list(&self) -> Vec<Operation> {
        lock(&self.ops).iter().cloned().collect()
    }

    /// Waits until `id` has ended, at most `timeout`; `None` when there is no such operation.
    pub async fn wait(&self, id: Uuid, timeout: Duration) -> Option<Operation> {
        let mut rx = self.changed.subscribe();
        let ended = |_: &u64| self.get(id).is_none_or(|o| o.state.is_done());
        let _ = tokio::time::timeout(timeout, rx.wait_for(ended)).await;
        self.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn run_on_the_pool_and_wait() {
        let ops = Arc::new(Operations::default());
        let op = ops.begin(Action::Start, Uuid::nil());
        assert_eq!(op.state, OperationState::Pending);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        ops.run(
            &tokio::runtime::Handle::current(),
            op.id,
            async move {
                let _ = rx.await;
                Err("no".to_string())
            },
            move |r| {
                let _ = done_tx.send(r);
            },
        );
        let still = ops.wait(op.id, Duration::from_millis(20)).await.unwrap();
        assert_eq!(still.state, OperationState::Running);
        tx.send(()).unwrap();
        let ended = ops.wait(op.id, Duration::from_secs(30)).await.unwrap();
        assert_eq!(ended.state, OperationState::Failed);
        assert_eq!(ended.error.as_deref(), Some("no"));
        assert_eq!(done_rx.await.unwrap(), Err("no".to_string()));
        assert!(ops
            .wait(Uuid::nil(), Duration::from_secs(30))
            .await
            .is_none());
    }

    #[tokio::test]
    async fn the_pool_is_bounded() {
        let ops = Arc::new(Operations::default());
        let (tx, _) = tokio::sync::broadcast::channel::<()>(1);
        let mut ids = Vec::new();
        for _ in 0..POOL + 1 {
            let op = ops.begin(Action::Stop, Uuid::nil());
            let mut rx = tx.subscribe();
            ops.run(
                &tokio::runtime::Handle::current(),
                op.id,
                async move {
                    let _ = rx.recv().await;
                    Ok(())
                },
                |_| {},
            );
            ids.push(op.id);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let running = ops
            .list()
            .iter()
            .filter(|o| o.state == OperationState::Running)
            .count();
        assert_eq!(running, POOL);
        assert_eq!(ops.get(ids[POOL]).unwrap().state, OperationState::Pending);
        tx.send(()).unwrap();
        for id in ids {
            let op = ops.wait(id, Duration::from_secs(30)).await.unwrap();
            assert_eq!(op.state, OperationState::Succeeded);
        }
    }
}
