//! A sector cipher that can be taken away and given back: what `nbdcrypt suspend` and
//! `resume` act on (cryptsetup's `luksSuspend` / `luksResume`).
//!
//! While the gate is *suspended* it holds no [`SectorCipher`], hence no key schedule:
//! suspending drops the cipher, which wipes the wide engine's schedules, or frees (and
//! cleanses) its AWS-LC contexts with `EVP_CIPHER_CTX_free`. A cipher call made while
//! suspended does not fail: it waits until the gate is resumed with a new cipher (unlocked
//! again through a key slot), or closed at shutdown, in which case it fails with
//! [`GateError::Closed`].
//!
//! # Cost on the hot path
//!
//! The cipher sits in an [`ArcSwapOption`]: a call loads it with a thread-local "debt" (no
//! write to a cache line shared with other threads, unlike an `RwLock`'s reader count), uses
//! it, and releases it. Only a suspended gate touches the mutex and the condvar. Suspending
//! swaps the cipher out (which turns outstanding debts into real references) and waits until
//! the last call still using it has finished before dropping it, so a call in progress always
//! completes with the key it started with. `benches/gate.rs` measures the cost.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwapOption;

use super::xts::{CipherEngine, CipherError, SectorCipher};
use crate::backend::Mapped;
use crate::units::SectorIndex;

/// Failures of a gated cipher call.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The gate was closed (the daemon is shutting down) while the call waited for a resume.
    #[error("the volume is suspended and the server is shutting down")]
    Closed,
    /// The cipher itself failed.
    #[error(transparent)]
    Cipher(#[from] CipherError),
}

/// Whether the gate holds a cipher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    /// Keyed: cipher calls run.
    Active,
    /// The cipher was dropped; cipher calls wait for a resume.
    Suspended,
    /// Shut down: waiting and later calls fail with [`GateError::Closed`] if no cipher is held.
    Closed,
}

/// A [`SectorCipher`] behind a suspend/resume gate. See the module documentation.
#[derive(Debug)]
pub struct CipherGate {
    cipher: ArcSwapOption<SectorCipher>,
    state: Mutex<GateState>,
    resumed: Condvar,
}

impl CipherGate {
    pub fn new(cipher: SectorCipher) -> Self {
        CipherGate {
            cipher: ArcSwapOption::from_pointee(cipher),
            state: Mutex::new(GateState::Active),
            resumed: Condvar::new(),
        }
    }

    /// The engine of the cipher held; `None` while suspended (no cipher, no key).
    pub fn engine(&self) -> Option<CipherEngine> {
        self.cipher.load().as_ref().map(|c| c.engine())
    }

    /// Encrypts whole sectors in place, waiting while the gate is suspended.
    pub fn encrypt(&self, first: SectorIndex, buf: &mut [u8]) -> Result<(), GateError> {
        self.with(|c| c.encrypt(first, buf))
    }

    /// Decrypts whole sectors in place, waiting while the gate is suspended.
    pub fn decrypt(&self, first: SectorIndex, buf: &mut [u8]) -> Result<(), GateError> {
        self.with(|c| c.decrypt(first, buf))
    }

    /// [`SectorCipher::decrypt_mapped`], waiting while the gate is suspended.
    pub fn decrypt_mapped(&self, first: SectorIndex, src: Mapped<'_>, dst: &mut [u8]) -> Result<(), GateError> {
        self.with(|c| c.decrypt_mapped(first, src, dst))
    }

    /// [`CipherGate::encrypt`] for a caller that must not block (an async task): `None`,
    /// with `buf` untouched, if the gate is suspended.
    pub fn try_encrypt(&self, first: SectorIndex, buf: &mut [u8]) -> Option<Result<(), GateError>> {
        self.try_with(|c| c.encrypt(first, buf))
    }

    /// [`CipherGate::decrypt`] for a caller that must not block: `None` if suspended.
    pub fn try_decrypt(&self, first: SectorIndex, buf: &mut [u8]) -> Option<Result<(), GateError>> {
        self.try_with(|c| c.decrypt(first, buf))
    }

    /// [`CipherGate::decrypt_mapped`] for a caller that must not block: `None` if suspended.
    pub fn try_decrypt_mapped(
        &self,
        first: SectorIndex,
        src: Mapped<'_>,
        dst: &mut [u8],
    ) -> Option<Result<(), GateError>> {
        self.try_with(|c| c.decrypt_mapped(first, src, dst))
    }

    fn try_with(&self, f: impl FnOnce(&SectorCipher) -> Result<(), CipherError>) -> Option<Result<(), GateError>> {
        let guard = self.cipher.load();
        guard.as_ref().map(|c| f(c).map_err(GateError::from))
    }

    fn with(&self, f: impl FnOnce(&SectorCipher) -> Result<(), CipherError>) -> Result<(), GateError> {
        loop {
            {
                let guard = self.cipher.load();
                if let Some(c) = guard.as_ref() {
                    return f(c).map_err(GateError::from);
                }
            }
            self.wait_while_suspended()?;
        }
    }

    /// Blocks while the gate is suspended; returns once it is active again (the caller then
    /// loads the new cipher) or fails if it was closed.
    fn wait_while_suspended(&self) -> Result<(), GateError> {
        let mut state = self.lock_state();
        loop {
            match *state {
                GateState::Active => return Ok(()),
                GateState::Closed => return Err(GateError::Closed),
                GateState::Suspended => state = self.resumed.wait(state).unwrap_or_else(|p| p.into_inner()),
            }
        }
    }

    /// Drops the cipher (and with it every AWS-LC context holding the key schedule), after the
    /// calls still using it have finished. Returns false if it was not active. Blocking: call
    /// it off the async runtime.
    pub fn suspend(&self) -> bool {
        {
            let mut state = self.lock_state();
            if *state != GateState::Active {
                return false;
            }
            *state = GateState::Suspended;
        }
        let Some(mut old) = self.cipher.swap(None) else { return true };
        // The swap turned every outstanding load into a counted reference; each goes away when
        // its cipher call returns (a call is at most one 32 MiB request: milliseconds).
        loop {
            match Arc::try_unwrap(old) {
                Ok(cipher) => {
                    drop(cipher);
                    return true;
                }
                Err(still_used) => {
                    old = still_used;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Installs a new cipher and wakes every waiting call. Returns false (and drops `cipher`)
    /// if the gate was not suspended.
    pub fn resume(&self, cipher: SectorCipher) -> bool {
        let mut state = self.lock_state();
        if *state != GateState::Suspended {
            return false;
        }
        self.cipher.store(Some(Arc::new(cipher)));
        *state = GateState::Active;
        drop(state);
        self.resumed.notify_all();
        true
    }

    /// Shutdown: calls waiting for a resume (and later ones, if suspended) fail with
    /// [`GateError::Closed`] instead of waiting forever. An active gate keeps serving, so
    /// requests in flight at shutdown still drain normally.
    pub fn close(&self) {
        let mut state = self.lock_state();
        if *state == GateState::Suspended {
            *state = GateState::Closed;
        }
        drop(state);
        self.resumed.notify_all();
    }

    pub fn state(&self) -> GateState {
        *self.lock_state()
    }

    fn lock_state(&self) -> MutexGuard<'_, GateState> {
        // Nothing panics while holding this lock; a poisoned state is still a valid enum.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::VolumeKey;
    use crate::units::SectorSize;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn gate() -> (CipherGate, VolumeKey) {
        let key = VolumeKey::generate().unwrap();
        (CipherGate::new(SectorCipher::new(&key, SectorSize::S512).unwrap()), key)
    }

    #[test]
    fn suspend_then_resume_with_the_same_key_round_trips() {
        let (g, key) = gate();
        let mut buf = vec![7u8; 1024];
        g.encrypt(SectorIndex(3), &mut buf).unwrap();
        assert!(g.suspend());
        assert_eq!(g.state(), GateState::Suspended);
        assert!(g.resume(SectorCipher::new(&key, SectorSize::S512).unwrap()));
        g.decrypt(SectorIndex(3), &mut buf).unwrap();
        assert_eq!(buf, vec![7u8; 1024]);
    }

    #[test]
    fn a_call_while_suspended_waits_for_resume() {
        let (g, key) = gate();
        let g = Arc::new(g);
        assert!(g.suspend());
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (g, done) = (g.clone(), done.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 512];
                let r = g.encrypt(SectorIndex(0), &mut buf);
                done.store(true, Ordering::SeqCst);
                r
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "the call must wait while suspended");
        assert!(g.resume(SectorCipher::new(&key, SectorSize::S512).unwrap()));
        t.join().unwrap().unwrap();
    }

    #[test]
    fn close_fails_waiting_calls() {
        let (g, _) = gate();
        let g = Arc::new(g);
        g.suspend();
        let t = {
            let g = g.clone();
            std::thread::spawn(move || g.decrypt(SectorIndex(0), &mut [0u8; 512]))
        };
        std::thread::sleep(Duration::from_millis(20));
        g.close();
        assert!(matches!(t.join().unwrap(), Err(GateError::Closed)));
    }

    #[test]
    fn suspend_frees_every_context_of_the_cipher() {
        let key = VolumeKey::generate().unwrap();
        let cipher = SectorCipher::new(&key, SectorSize::S512).unwrap();
        let live = cipher.live_counter();
        let g = CipherGate::new(cipher);
        g.encrypt(SectorIndex(0), &mut [0u8; 512]).unwrap();
        assert!(live.load(Ordering::Relaxed) > 0);
        assert!(g.suspend());
        assert_eq!(live.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn resume_of_an_active_gate_is_refused() {
        let (g, key) = gate();
        assert!(!g.resume(SectorCipher::new(&key, SectorSize::S512).unwrap()));
        assert_eq!(g.state(), GateState::Active);
    }
}
