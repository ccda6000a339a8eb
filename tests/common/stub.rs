//! One configurable store for the tests: another store (a `MemoryStore` by default) behind a
//! layer that counts every operation, records the keys it claims and completes, and can be told
//! to make any operation fail, hang or panic.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower_idempotency::{
    Attempt, Claim, CompletedRecord, Fenced, IdempotencyStore, MemoryStore, StoreError,
};

/// A store operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Claim,
    Renew,
    Complete,
    Release,
}

/// What an operation does instead of reaching the store behind.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Fails as an unreachable store does.
    Fail,
    /// Never answers.
    Hang,
    /// Panics.
    Panic,
    /// Reaches the store, then fails as if the answer were lost on the way back: the
    /// operation applied, and the caller cannot know.
    LoseAnswer,
}

#[derive(Default)]
struct State {
    calls: HashMap<Op, usize>,
    faults: HashMap<Op, Fault>,
    claimed: Vec<String>,
    completed: HashMap<String, Instant>,
}

/// See the module docs. Clones share their counts and faults.
#[derive(Clone)]
pub struct Stub<S = MemoryStore> {
    inner: S,
    state: Arc<Mutex<State>>,
}

impl Stub<MemoryStore> {
    /// Around a fresh `MemoryStore`.
    pub fn memory() -> Self {
        Self::new(MemoryStore::new())
    }

    /// Every operation fails, as against an unreachable store.
    pub fn down() -> Self {
        let stub = Self::memory();
        for op in [Op::Claim, Op::Renew, Op::Complete, Op::Release] {
            stub.set(op, Fault::Fail);
        }
        stub
    }
}

impl<S> Stub<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            state: Arc::default(),
        }
    }

    /// Makes `op` do `fault` from now on.
    pub fn set(&self, op: Op, fault: Fault) {
        self.state.lock().unwrap().faults.insert(op, fault);
    }

    /// Makes `op` reach the store again.
    pub fn clear(&self, op: Op) {
        self.state.lock().unwrap().faults.remove(&op);
    }

    /// Builder form of [`Stub::set`].
    pub fn with(self, op: Op, fault: Fault) -> Self {
        self.set(op, fault);
        self
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: Op) -> usize {
        self.state
            .lock()
            .unwrap()
            .calls
            .get(&op)
            .copied()
            .unwrap_or(0)
    }

    /// The keys claimed, in order.
    pub fn claimed(&self) -> Vec<String> {
        self.state.lock().unwrap().claimed.clone()
    }

    /// When `key` was completed, if it was.
    pub fn completed_at(&self, key: &str) -> Option<Instant> {
        self.state.lock().unwrap().completed.get(key).copied()
    }

    /// Counts the call; the fault to apply, if any.
    fn enter(&self, op: Op, key: &str) -> Option<Fault> {
        let mut state = self.state.lock().unwrap();
        *state.calls.entry(op).or_default() += 1;
        if op == Op::Claim {
            state.claimed.push(key.to_owned());
        }
        state.faults.get(&op).copied()
    }
}

async fn faulty<T>(
    fault: Option<Fault>,
    op: impl Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    match fault {
        None => op.await,
        Some(Fault::Fail) => Err(StoreError::backend("connection refused")),
        Some(Fault::Hang) => std::future::pending().await,
        Some(Fault::Panic) => panic!("the store fails"),
        Some(Fault::LoseAnswer) => {
            let _ = op.await;
            Err(StoreError::backend(
                "connection reset after the request was sent",
            ))
        }
    }
}

impl<S: IdempotencyStore> IdempotencyStore for Stub<S> {
    type Token = S::Token;

    async fn claim(
        &self,
        key: &str,
        attempt: &Attempt,
        lease: Duration,
    ) -> Result<Claim<S::Token>, StoreError> {
        let fault = self.enter(Op::Claim, key);
        faulty(fault, self.inner.claim(key, attempt, lease)).await
    }

    async fn renew(
        &self,
        key: &str,
        token: &mut S::Token,
        lease: Duration,
    ) -> Result<Fenced, StoreError> {
        let fault = self.enter(Op::Renew, key);
        faulty(fault, self.inner.renew(key, token, lease)).await
    }

    async fn complete(
        &self,
        key: &str,
        token: &S::Token,
        record: &CompletedRecord,
        ttl: Duration,
    ) -> Result<Fenced, StoreError> {
        let fault = self.enter(Op::Complete, key);
        let fenced = faulty(fault, self.inner.complete(key, token, record, ttl)).await;
        if matches!(fenced, Ok(Fenced::Applied)) {
            let mut state = self.state.lock().unwrap();
            state.completed.insert(key.to_owned(), Instant::now());
        }
        fenced
    }

    async fn release(&self, key: &str, attempt: &Attempt) -> Result<Fenced, StoreError> {
        let fault = self.enter(Op::Release, key);
        faulty(fault, self.inner.release(key, attempt)).await
    }

    async fn prepare(
        &self,
        token: &mut S::Token,
        extensions: &mut http::Extensions,
    ) -> Result<(), StoreError> {
        self.inner.prepare(token, extensions).await
    }

    fn commits_handler_writes(&self, token: &S::Token) -> bool {
        self.inner.commits_handler_writes(token)
    }
}
