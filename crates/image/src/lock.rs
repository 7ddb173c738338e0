//! The exclusive image lock, client side: a sans-IO state machine ([`LockMachine`]) and the
//! thin runtime around it ([`LockHandle`]).
//!
//! Writes need the lock; reads do not. A writer asks [`LockMachine::begin`]: with the lock
//! it goes at once, carrying the lock's generation to the OSDs; without it the machine
//! asks the monitors for the lock and the writer waits. When the map shows another session
//! waiting for the lock, the machine stops starting writes, lets the ones in flight finish
//! and releases; writes that arrive meanwhile wait and ask for the lock back afterwards
//! (librbd's exclusive-lock behaviour during QEMU live migration). A blocklisted session is
//! fenced: every write fails. docs/image-locks.md has the whole protocol.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use store_client::ObjectClient;
use store_types::map::{session_name, ClusterMap, SessionId, WriteGuard};
use store_types::msg::{LockClaim, MapCommand};
use store_types::{ErrorCode, StoreError};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// Pause before asking again for a lock held by another session, or after a failed ask.
const RETRY_MS: u64 = 250;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockState {
    Unlocked,
    /// Asked the monitors (or waiting for the holder to hand the lock over).
    Acquiring,
    Locked {
        generation: u64,
    },
    /// Another session waits: no new writes start; release once none is in flight.
    Releasing {
        generation: u64,
    },
    /// Blocklisted: every write fails, for good.
    Fenced {
        reason: String,
    },
}

/// The image's lock as one map shows it, from this session's point of view.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockView {
    pub holder_is_me: bool,
    pub free: bool,
    pub generation: u64,
    pub requested_by_other: bool,
    pub me_blocklisted: Option<String>,
}

impl LockView {
    pub fn of(map: &ClusterMap, key: &str, me: SessionId) -> LockView {
        let lock = map.image_locks.get(key);
        LockView {
            holder_is_me: lock.is_some_and(|l| l.holder == Some(me)),
            free: lock.is_none_or(|l| {
                l.holder.is_none() || l.holder.is_some_and(|h| map.blocklist.contains_key(&h))
            }),
            generation: lock.map_or(0, |l| l.generation),
            requested_by_other: lock.is_some_and(|l| l.requested_by.is_some_and(|r| r != me)),
            me_blocklisted: map.blocklist.get(&me).map(|b| b.reason.clone()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A map arrived.
    Map(LockView),
    /// The monitors answered a claim: granted, or the holder was asked to release.
    AcquireAnswered {
        granted: bool,
    },
    AcquireFailed(StoreError),
    /// The release applied (now, or before if it was resent), and this session's map has it.
    ReleaseAnswered,
    /// The release could not be sent or answered: send it again.
    ReleaseFailed,
    /// The monitors refused the release: the lock was taken from this session without it,
    /// i.e. the session was fenced.
    ReleaseRefused(StoreError),
    /// The retry pause passed.
    Retry,
    WriteDone,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Acquire,
    Release {
        generation: u64,
    },
    /// Feed [`Event::Retry`] after a pause.
    RetryLater,
    /// The state changed in a way waiting writers care about.
    Wake,
}

/// What a writer is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Begin {
    Go { generation: u64 },
    Wait,
    Fail(StoreError),
}

#[derive(Debug)]
pub struct LockMachine {
    state: LockState,
    in_flight: usize,
    acquire_sent: bool,
    release_sent: bool,
    /// A release was sent for the generation being released (perhaps applied, even if its
    /// answer was lost): from then on only an answer ends Releasing.
    release_tried: bool,
    /// The generation this session last released: a map that still shows it as the
    /// holder at that generation is older than the release, not a hand-back.
    released_generation: u64,
    retry_armed: bool,
    last_error: Option<StoreError>,
}

impl Default for LockMachine {
    fn default() -> Self {
        Self::new()
    }
}

impl LockMachine {
    pub fn new() -> Self {
        LockMachine {
            state: LockState::Unlocked,
            in_flight: 0,
            acquire_sent: false,
            release_sent: false,
            release_tried: false,
            released_generation: 0,
            retry_armed: false,
            last_error: None,
        }
    }

    pub fn state(&self) -> &LockState {
        &self.state
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn last_error(&self) -> Option<&StoreError> {
        self.last_error.as_ref()
    }

    fn acquire(&mut self, cmds: &mut Vec<Command>) {
        if !self.acquire_sent {
            self.acquire_sent = true;
            cmds.push(Command::Acquire);
        }
    }

    fn retry_later(&mut self, cmds: &mut Vec<Command>) {
        if !self.retry_armed {
            self.retry_armed = true;
            cmds.push(Command::RetryLater);
        }
    }

    fn release_if_idle(&mut self, cmds: &mut Vec<Command>) {
        if let LockState::Releasing { generation } = self.state {
            if self.in_flight == 0 && !self.release_sent {
                self.release_sent = true;
                self.release_tried = true;
                cmds.push(Command::Release { generation });
            }
        }
    }

    fn set(&mut self, state: LockState, cmds: &mut Vec<Command>) {
        if self.state != state {
            self.state = state;
            cmds.push(Command::Wake);
        }
    }

    /// A writer wants to start.
    pub fn begin(&mut self) -> (Begin, Vec<Command>) {
        let mut cmds = Vec::new();
        let b = match &self.state {
            LockState::Locked { generation } => {
                self.in_flight += 1;
                Begin::Go {
                    generation: *generation,
                }
            }
            LockState::Fenced { reason } => {
                Begin::Fail(StoreError::new(ErrorCode::Blocklisted, reason.clone()))
            }
            LockState::Unlocked => {
                self.state = LockState::Acquiring;
                self.acquire(&mut cmds);
                Begin::Wait
            }
            LockState::Acquiring | LockState::Releasing { .. } => Begin::Wait,
        };
        (b, cmds)
    }

    pub fn handle(&mut self, ev: Event) -> Vec<Command> {
        let mut cmds = Vec::new();
        if let LockState::Fenced { .. } = self.state {
            if ev == Event::WriteDone {
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            return cmds;
        }
        match ev {
            Event::Map(v) => self.on_map(v, &mut cmds),
            Event::AcquireAnswered { granted } => {
                self.acquire_sent = false;
                if !granted && self.state == LockState::Acquiring {
                    self.retry_later(&mut cmds);
                }
            }
            Event::AcquireFailed(e) => {
                self.acquire_sent = false;
                // Blocklisted, or the lock was once taken from this session (its entry
                // may have expired since): fenced either way.
                if matches!(e.code, ErrorCode::Blocklisted | ErrorCode::LockLost) {
                    let reason = e.message.clone();
                    self.set(LockState::Fenced { reason }, &mut cmds);
                } else if self.state == LockState::Acquiring {
                    self.retry_later(&mut cmds);
                }
                self.last_error = Some(e);
            }
            Event::ReleaseAnswered => {
                if let LockState::Releasing { generation } = self.state {
                    self.release_sent = false;
                    self.released_generation = generation;
                    self.set(LockState::Unlocked, &mut cmds);
                }
            }
            Event::ReleaseRefused(e) => {
                self.release_sent = false;
                let reason = e.message.clone();
                self.set(LockState::Fenced { reason }, &mut cmds);
                self.last_error = Some(e);
            }
            Event::ReleaseFailed => {
                self.release_sent = false;
                self.retry_later(&mut cmds);
            }
            Event::Retry => {
                self.retry_armed = false;
                match self.state {
                    LockState::Acquiring => self.acquire(&mut cmds),
                    LockState::Releasing { .. } => self.release_if_idle(&mut cmds),
                    _ => {}
                }
            }
            Event::WriteDone => {
                self.in_flight = self.in_flight.saturating_sub(1);
                self.release_if_idle(&mut cmds);
            }
        }
        cmds
    }

    fn on_map(&mut self, v: LockView, cmds: &mut Vec<Command>) {
        if let Some(reason) = v.me_blocklisted {
            self.set(
                LockState::Fenced {
                    reason: format!("this session is blocklisted: {reason}"),
                },
                cmds,
            );
            return;
        }
        match self.state.clone() {
            LockState::Unlocked => {
                if v.holder_is_me && v.generation > self.released_generation {
                    // Handed to us (we asked before): take it.
                    self.set(
                        LockState::Locked {
                            generation: v.generation,
                        },
                        cmds,
                    );
                }
            }
            LockState::Acquiring => {
                if v.holder_is_me && v.generation > self.released_generation {
                    self.set(
                        LockState::Locked {
                            generation: v.generation,
                        },
                        cmds,
                    );
                } else if v.free {
                    self.acquire(cmds);
                }
            }
            LockState::Locked { generation } => {
                if !v.holder_is_me {
                    // A holder gives the lock up only by releasing it (Releasing): one taken
                    // from it was broken, so it was fenced, whether or not the blocklist
                    // entry is still there (entries expire). Writes it still has queued
                    // must never land.
                    self.set(
                        LockState::Fenced {
                            reason: format!(
                                "the lock (generation {generation}) was taken from this session \
                                 without a release: it was fenced"
                            ),
                        },
                        cmds,
                    );
                } else if v.generation != generation {
                    self.set(LockState::Unlocked, cmds);
                } else if v.requested_by_other {
                    self.release_sent = false;
                    self.release_tried = false;
                    self.set(LockState::Releasing { generation }, cmds);
                    self.release_if_idle(cmds);
                }
            }
            LockState::Releasing { generation } => {
                if self.release_tried {
                    // Only the answer to the release says whether it applied (Unlocked) or
                    // the lock had been taken from us first (Fenced).
                } else if !v.holder_is_me || v.generation != generation {
                    // Taken while our writes drained, before we released: broken.
                    self.set(
                        LockState::Fenced {
                            reason: format!(
                                "the lock (generation {generation}) was taken from this session \
                                 before it released it: it was fenced"
                            ),
                        },
                        cmds,
                    );
                } else if !v.requested_by_other {
                    // The waiter gave up: keep the lock.
                    self.set(LockState::Locked { generation }, cmds);
                }
            }
            LockState::Fenced { .. } => {}
        }
    }
}

/// Who this lock handle is, for claims and for `storectl client ls`.
#[derive(Clone, Debug)]
pub struct LockIdentity {
    pub session: SessionId,
    pub lock_key: String,
    /// `pool/image`.
    pub image: String,
    pub desc: String,
    pub instance: u64,
}

/// The runtime: carries out the machine's commands against the monitors and follows the
/// map.
pub struct LockHandle {
    id: LockIdentity,
    client: Arc<ObjectClient>,
    machine: Mutex<LockMachine>,
    changed: Notify,
    wait_timeout: Duration,
}

impl LockHandle {
    pub fn new(id: LockIdentity, client: Arc<ObjectClient>, wait_timeout: Duration) -> Arc<Self> {
        let h = Arc::new(LockHandle {
            id,
            client,
            machine: Mutex::new(LockMachine::new()),
            changed: Notify::new(),
            wait_timeout,
        });
        tokio::spawn(follow_maps(Arc::downgrade(&h)));
        h
    }

    pub fn identity(&self) -> &LockIdentity {
        &self.id
    }

    pub fn state(&self) -> LockState {
        self.machine.lock().expect("lock machine").state().clone()
    }

    fn feed(self: &Arc<Self>, ev: Event) {
        let cmds = self.machine.lock().expect("lock machine").handle(ev);
        self.execute(cmds);
    }

    fn execute(self: &Arc<Self>, cmds: Vec<Command>) {
        for c in cmds {
            match c {
                Command::Wake => self.changed.notify_waiters(),
                Command::Acquire => {
                    let me = self.clone();
                    tokio::spawn(async move { me.acquire().await });
                }
                Command::Release { generation } => {
                    let me = self.clone();
                    tokio::spawn(async move { me.release(generation).await });
                }
                Command::RetryLater => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(RETRY_MS)).await;
                        me.feed(Event::Retry);
                    });
                }
            }
        }
    }

    async fn acquire(self: Arc<Self>) {
        let claim = LockClaim {
            lock_key: self.id.lock_key.clone(),
            image: self.id.image.clone(),
            session: self.id.session,
            desc: self.id.desc.clone(),
            instance: self.id.instance,
        };
        let ev = match self
            .client
            .mons()
            .command(MapCommand::LockAcquire(claim))
            .await
        {
            Ok(out) => {
                debug!(image = %self.id.image, "lock claim: {}", out.message);
                if out.lock_generation.is_some() {
                    info!(image = %self.id.image, session = %session_name(self.id.session), "{}", out.message);
                    // The grant takes effect here when our map has it (follow_maps), so
                    // every write we send carries a map at least as new as the grant.
                    self.wait_for_epoch(out.epoch).await;
                }
                Event::AcquireAnswered {
                    granted: out.lock_generation.is_some(),
                }
            }
            Err(e) => {
                debug!(image = %self.id.image, "lock claim failed: {e}");
                Event::AcquireFailed(e)
            }
        };
        self.feed(ev);
    }

    async fn release(self: Arc<Self>, generation: u64) {
        let cmd = MapCommand::LockRelease {
            lock_key: self.id.lock_key.clone(),
            session: self.id.session,
            generation,
        };
        match self.client.mons().command(cmd).await {
            Ok(out) => {
                info!(image = %self.id.image, "{}", out.message);
                self.wait_for_epoch(out.epoch).await;
                self.feed(Event::ReleaseAnswered);
            }
            // Taken from us, or the lock is gone altogether (the image was removed after
            // a break): either way this session may never write again.
            Err(e) if matches!(e.code, ErrorCode::LockLost | ErrorCode::NotFound) => {
                warn!(image = %self.id.image, "this session is fenced: {e}");
                self.feed(Event::ReleaseRefused(e));
            }
            Err(e) => {
                warn!(image = %self.id.image, "lock release failed, retrying: {e}");
                self.feed(Event::ReleaseFailed);
            }
        }
    }

    async fn wait_for_epoch(&self, epoch: u64) {
        let mut rx = self.client.maps();
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|m| m.as_ref().is_some_and(|m| m.epoch >= epoch)),
        )
        .await;
    }

    fn on_map(self: &Arc<Self>, map: &ClusterMap) {
        self.feed(Event::Map(LockView::of(
            map,
            &self.id.lock_key,
            self.id.session,
        )));
    }

    /// Waits until a write may start; the guard to send with it.
    pub async fn begin_write(self: &Arc<Self>) -> Result<WriteGuard, StoreError> {
        let deadline = tokio::time::Instant::now() + self.wait_timeout;
        loop {
            // Register interest before looking, so a wake between the two is not lost.
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (b, cmds) = self.machine.lock().expect("lock machine").begin();
            self.execute(cmds);
            match b {
                Begin::Go { generation } => {
                    return Ok(WriteGuard {
                        session: self.id.session,
                        lock_key: self.id.lock_key.clone(),
                        generation,
                    })
                }
                Begin::Fail(e) => return Err(e),
                Begin::Wait => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        let why = self
                            .machine
                            .lock()
                            .expect("lock machine")
                            .last_error()
                            .map_or(String::new(), |e| format!(": {e}"));
                        return Err(StoreError::new(
                            ErrorCode::LockBusy,
                            format!(
                                "image {} lock not obtained within {} s{why}",
                                self.id.image,
                                self.wait_timeout.as_secs()
                            ),
                        ));
                    }
                }
            }
        }
    }

    pub fn end_write(self: &Arc<Self>) {
        self.feed(Event::WriteDone);
    }

    /// Releases the lock if held and idle (closing the image).
    pub async fn close(self: &Arc<Self>) {
        let generation = match self.state() {
            LockState::Locked { generation } | LockState::Releasing { generation } => generation,
            _ => return,
        };
        let cmd = MapCommand::LockRelease {
            lock_key: self.id.lock_key.clone(),
            session: self.id.session,
            generation,
        };
        match self.client.mons().command(cmd).await {
            Ok(out) => info!(image = %self.id.image, "{}", out.message),
            Err(e) => warn!(image = %self.id.image, "lock release on close failed: {e}"),
        }
    }
}

/// Feeds every new map to the handle while it lives.
async fn follow_maps(h: Weak<LockHandle>) {
    let Some(mut rx) = h.upgrade().map(|h| h.client.maps()) else {
        return;
    };
    loop {
        let map = rx.borrow_and_update().clone();
        match (h.upgrade(), map) {
            (Some(handle), Some(map)) => handle.on_map(&map),
            (None, _) => return,
            _ => {}
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests;
