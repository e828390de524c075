//! The sector cipher: AES-256-XTS-plain64 over whole sectors, on one of two engines
//! ([`CipherEngine`]): our wide XTS on VAES/AVX-512 (`xts_wide`) where the CPU has it, else
//! AWS-LC's `EVP_aes_256_xts`. `NBDCRYPT_CIPHER=aws-lc` forces AWS-LC.
//!
//! This is exactly dm-crypt's `aes-xts-plain64` with `iv_large_sectors`, as LUKS2 uses it:
//! the 512-bit key is Key1 || Key2 (data key, tweak key; they must differ), each sector is one
//! XTS data unit, and its tweak is the sector index counted in units of the volume's sector size
//! (512 or 4096 bytes) from the start of the data area, as 16 little-endian bytes
//! ([`SectorIndex::tweak`]).
//!
//! # Contexts and key lifetime
//!
//! The wide engine keeps its key schedules in one [`crate::crypto::Secret`] (locked, wiped
//! when the cipher is dropped) and needs no context. On AWS-LC, the key schedule is computed
//! once, into a *template* `EVP_CIPHER_CTX` per direction; working contexts are byte copies of
//! it (`EVP_CIPHER_CTX_copy`) kept in a small lock-free pool, so a request only takes a
//! context, re-initialises the IV (the tweak) for each sector, calls `Update` in place and
//! gives the context back. The pool grows to the number of concurrent callers and keeps at
//! most `SLOTS` (32) idle contexts per direction.
//!
//! The cipher holds no copy of the key outside AWS-LC contexts, and every context is owned by
//! the [`SectorCipher`] (threads remember only a slot number, never a context): dropping the
//! cipher frees every context with `EVP_CIPHER_CTX_free`, whose `OPENSSL_free` cleanses the key
//! schedule. That is what makes suspending a volume forget its key. AWS-LC allocates the key
//! schedules itself; each is `mlock`ed once keyed or copied ([`crate::crypto::mlock`]), like a
//! [`crate::crypto::Secret`], and unlocked when freed.
//!
//! The FFI `unsafe` of the data path is here; the volume mapping that reads can decrypt from
//! is `backend::mapping`.

#![allow(unsafe_code)]

use std::ffi::c_int;
use std::fmt;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use aws_lc_sys as ffi;

use crate::backend::Mapped;
use crate::crypto::mlock::{self, PageLock};
use crate::crypto::secret::VolumeKey;
#[cfg(target_arch = "x86_64")]
use crate::crypto::xts_wide::WideXts;
use crate::units::{SectorIndex, SectorSize};

/// Idle contexts kept per direction (pool slots); more concurrent callers than this get a
/// context copied from the template that is freed again after use.
const SLOTS: usize = 32;

/// Size of AWS-LC's `EVP_AES_XTS_CTX`, the `cipher_data` an XTS context allocates: two AES
/// key schedules (244 bytes each, 8-aligned), an `XTS128_CONTEXT` (four pointers) and a flag,
/// padded. AWS-LC does not export it (its `EVP_CIPHER` is opaque); the test
/// `key_schedules_are_in_locked_memory` finds both schedules inside this many bytes.
const XTS_CTX_LEN: usize = 536;

/// Largest request [`measure_throughput`] will allocate (64 MiB).
const MAX_BENCH_REQUEST: usize = 64 << 20;

/// Failures of the sector cipher.
#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    /// The two 256-bit halves of the key are equal. XTS with Key1 = Key2 is insecure
    /// (Rogaway 2004; IEEE 1619-2018 and FIPS require the check), so such a key is refused.
    #[error("the two halves of the XTS key are equal; refusing to use it")]
    EqualKeyHalves,
    /// The buffer does not hold a whole number of sectors.
    #[error("buffer of {len} bytes is not a multiple of the {sector_size}-byte sector size")]
    UnalignedBuffer { len: usize, sector_size: u32 },
    /// The first sector index plus the number of sectors does not fit in 64 bits.
    #[error("the sector range overflows the 64-bit sector index")]
    SectorOverflow,
    /// Source and destination of an out-of-place call differ in length.
    #[error("source of {src} bytes and destination of {dst} bytes differ in length")]
    LengthMismatch { src: usize, dst: usize },
    /// An AWS-LC call failed; the payload names the call.
    #[error("AWS-LC call {0} failed")]
    Backend(&'static str),
}

/// Which implementation runs a [`SectorCipher`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CipherEngine {
    /// AWS-LC's `EVP_aes_256_xts`, one call per sector.
    AwsLc,
    /// Our XTS on the CPU's VAES/AVX-512 AES instructions, many sectors per call
    /// (`xts_wide`); chosen where the CPU has them.
    Wide,
}

impl CipherEngine {
    /// The engine [`SectorCipher::new`] picks on this CPU, for either sector size: the wide
    /// one where the CPU has it (`benches/xts.rs`: 1.8–1.9× AWS-LC with 512-byte sectors,
    /// 1.05–1.13× with 4096), unless the environment variable `NBDCRYPT_CIPHER=aws-lc` asks for
    /// AWS-LC.
    pub fn preferred() -> CipherEngine {
        if Self::wide_supported() && !aws_lc_requested() {
            CipherEngine::Wide
        } else {
            CipherEngine::AwsLc
        }
    }

    /// Whether this CPU runs [`CipherEngine::Wide`].
    pub fn wide_supported() -> bool {
        #[cfg(target_arch = "x86_64")]
        return WideXts::supported();
        #[cfg(not(target_arch = "x86_64"))]
        return false;
    }

    pub fn name(self) -> &'static str {
        match self {
            CipherEngine::AwsLc => "aws-lc",
            CipherEngine::Wide => "vaes-avx512",
        }
    }
}

impl fmt::Display for CipherEngine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// `NBDCRYPT_CIPHER=aws-lc`: an operator who wants only the library's code on the data path
/// (an audit, a FIPS policy), or a side-by-side measurement, gets it.
fn aws_lc_requested() -> bool {
    std::env::var_os("NBDCRYPT_CIPHER").is_some_and(|v| v == "aws-lc")
}

/// The implementation behind a cipher.
enum Engine {
    /// AWS-LC contexts, pooled per direction.
    AwsLc { enc: ContextPool, dec: ContextPool },
    /// The wide path's key schedules.
    #[cfg(target_arch = "x86_64")]
    Wide(Counted<WideXts>),
}

/// Key schedules outside AWS-LC, counted like its contexts (in the cipher's `live` and in
/// [`live_contexts`]), so "no key schedule left" means the same on either engine.
struct Counted<T> {
    inner: T,
    live: Arc<AtomicUsize>,
}

impl<T> Counted<T> {
    fn new(inner: T, live: &Arc<AtomicUsize>) -> Self {
        live.fetch_add(1, Ordering::Relaxed);
        LIVE_CONTEXTS.fetch_add(1, Ordering::Relaxed);
        Counted { inner, live: Arc::clone(live) }
    }
}

impl<T> Drop for Counted<T> {
    fn drop(&mut self) {
        // The schedules themselves are wiped by `inner`'s own drop, right after this.
        self.live.fetch_sub(1, Ordering::Relaxed);
        LIVE_CONTEXTS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// AES-256-XTS-plain64 over whole sectors of one volume. `Send + Sync`: callers on any thread
/// share one cipher; each AWS-LC call uses its own pooled context, the wide path needs none.
pub struct SectorCipher {
    sector_size: SectorSize,
    engine: Engine,
    /// Key-schedule holders alive for this cipher: AWS-LC contexts (templates, idle and in
    /// use), or 1 for the wide engine.
    live: Arc<AtomicUsize>,
    /// Decryption leaves all-zero sectors as zeros (the header's `zero_sectors`).
    zero_sectors: bool,
}

impl SectorCipher {
    /// Builds the cipher for `key` (Key1 || Key2) and the volume's sector size. Refuses a key
    /// whose halves are equal.
    pub fn new(key: &VolumeKey, sector_size: SectorSize) -> Result<Self, CipherError> {
        Self::with_engine(key, sector_size, CipherEngine::preferred())
    }

    /// As [`SectorCipher::new`], on the given engine (benchmarks and tests compare them).
    /// [`CipherEngine::Wide`] where the CPU lacks it falls back to AWS-LC.
    pub fn with_engine(key: &VolumeKey, sector_size: SectorSize, engine: CipherEngine) -> Result<Self, CipherError> {
        if !key.halves_differ() {
            return Err(CipherError::EqualKeyHalves);
        }
        let live = Arc::new(AtomicUsize::new(0));
        #[cfg(target_arch = "x86_64")]
        if engine == CipherEngine::Wide {
            if let Some(w) = WideXts::new(key) {
                let engine = Engine::Wide(Counted::new(w, &live));
                return Ok(SectorCipher { sector_size, engine, live, zero_sectors: false });
            }
        }
        aws_lc_rs::init();
        let enc = ContextPool::new(key, Direction::Encrypt, &live)?;
        let dec = ContextPool::new(key, Direction::Decrypt, &live)?;
        Ok(SectorCipher { sector_size, engine: Engine::AwsLc { enc, dec }, live, zero_sectors: false })
    }

    /// The engine this cipher runs on.
    pub fn engine(&self) -> CipherEngine {
        match self.engine {
            Engine::AwsLc { .. } => CipherEngine::AwsLc,
            #[cfg(target_arch = "x86_64")]
            Engine::Wide(_) => CipherEngine::Wide,
        }
    }

    /// With `on`, [`SectorCipher::decrypt`] leaves a sector whose ciphertext is all zeros as
    /// plaintext zeros: a sector never written since a sparse `migrate` reads as the zeros it
    /// stands for. Real ciphertext differs from zero in its first bytes with overwhelming
    /// probability, so the check costs one comparison per sector.
    pub fn with_zero_sectors(mut self, on: bool) -> Self {
        self.zero_sectors = on;
        self
    }

    pub fn sector_size(&self) -> SectorSize {
        self.sector_size
    }

    /// Encrypts whole sectors in place; `buf.len()` must be a multiple of the sector size;
    /// sector i of buf uses tweak `first + i`.
    ///
    /// A refused request (unaligned, overflowing) leaves `buf` untouched; after a
    /// [`CipherError::Backend`] failure its contents are unspecified.
    pub fn encrypt(&self, first: SectorIndex, buf: &mut [u8]) -> Result<(), CipherError> {
        self.run(Direction::Encrypt, first, None, buf)
    }

    /// Decrypts whole sectors in place; `buf.len()` must be a multiple of the sector size;
    /// sector i of buf uses tweak `first + i`. Errors as for [`SectorCipher::encrypt`].
    pub fn decrypt(&self, first: SectorIndex, buf: &mut [u8]) -> Result<(), CipherError> {
        self.decrypt_from(first, None, buf)
    }

    /// Decrypts whole sectors from `src`, bytes of a mapping of the volume, into `dst` (of the
    /// same length): one pass over the ciphertext, where `pread` and [`SectorCipher::decrypt`]
    /// make two. Otherwise as `decrypt`.
    pub fn decrypt_mapped(&self, first: SectorIndex, src: Mapped<'_>, dst: &mut [u8]) -> Result<(), CipherError> {
        self.decrypt_from(first, Some(src), dst)
    }

    /// Decrypts `src` (or `dst` itself, in place) into `dst`. With zero sectors on, an all-zero
    /// ciphertext sector reads as zeros, and each run of other sectors is decrypted in one
    /// call, so the wide AES path stays fed.
    fn decrypt_from(&self, first: SectorIndex, src: Option<Mapped<'_>>, dst: &mut [u8]) -> Result<(), CipherError> {
        if let Some(m) = src.filter(|m| m.len() != dst.len()) {
            return Err(CipherError::LengthMismatch { src: m.len(), dst: dst.len() });
        }
        if !self.zero_sectors {
            return self.run(Direction::Decrypt, first, src, dst);
        }
        let ss = self.sector_size.bytes_usize();
        if !dst.len().is_multiple_of(ss) {
            return Err(CipherError::UnalignedBuffer { len: dst.len(), sector_size: self.sector_size.bytes() });
        }
        let n = dst.len() / ss;
        let mut i = 0;
        while i < n {
            let zero = |k: usize| match src {
                Some(m) => m.sub(k * ss, ss).is_some_and(mapped_is_zero),
                None => is_zero(&dst[k * ss..(k + 1) * ss]),
            };
            let run_is_zero = zero(i);
            let mut end = i + 1;
            while end < n && zero(end) == run_is_zero {
                end += 1;
            }
            let part = &mut dst[i * ss..end * ss];
            if !run_is_zero {
                let at = first.checked_add(i as u64).ok_or(CipherError::SectorOverflow)?;
                let from = src.map(|m| m.sub(i * ss, part.len()).ok_or(CipherError::SectorOverflow)).transpose()?;
                self.run(Direction::Decrypt, at, from, part)?;
            } else if src.is_some() {
                part.fill(0);
            }
            i = end;
        }
        Ok(())
    }

    /// Runs the cipher over whole sectors from `src` (`buf.len()` bytes; `None`: in place)
    /// into `buf`.
    fn run(
        &self,
        dir: Direction,
        first: SectorIndex,
        src: Option<Mapped<'_>>,
        buf: &mut [u8],
    ) -> Result<(), CipherError> {
        let ss = self.sector_size.bytes_usize();
        if !buf.len().is_multiple_of(ss) {
            return Err(CipherError::UnalignedBuffer { len: buf.len(), sector_size: self.sector_size.bytes() });
        }
        let count = u64::try_from(buf.len() / ss).map_err(|_| CipherError::SectorOverflow)?;
        first.checked_add(count).ok_or(CipherError::SectorOverflow)?;
        if buf.is_empty() {
            return Ok(());
        }
        debug_assert!(src.is_none_or(|m| m.len() == buf.len()));
        let dst = buf.as_mut_ptr();
        let src = src.map_or(dst.cast_const(), |m| m.as_ptr());
        let pool = match &self.engine {
            Engine::AwsLc { enc, dec } => match dir {
                Direction::Encrypt => enc,
                Direction::Decrypt => dec,
            },
            #[cfg(target_arch = "x86_64")]
            Engine::Wide(w) => {
                // SAFETY: `src` is `buf` itself or a mapping of `buf.len()` readable bytes
                // that does not overlap it (checked by the callers); `buf.len()` is whole
                // sectors, the sector size (a `SectorSize`: 512 or 4096) a multiple of 512,
                // and `first + count` was checked above not to overflow.
                unsafe { w.inner.crypt(dir, first.0, ss, src, dst, buf.len()) };
                return Ok(());
            }
        };
        let home = home();
        let mut ctx = pool.take(home)?;
        let result = ctx.crypt_sectors(dir, first, ss, src, dst, buf.len());
        // A context whose call failed is dropped (freed) rather than reused.
        if result.is_ok() {
            pool.give(home, ctx);
        }
        result
    }

    /// Live key-schedule holders of this cipher, for tests of the drop guarantee.
    #[cfg(test)]
    pub(crate) fn live_counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.live)
    }
}

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SectorCipher")
            .field("sector_size", &self.sector_size.bytes())
            .field("engine", &self.engine())
            .field("contexts", &self.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// True if every byte of `s` is zero; returns at the first non-zero 8-byte word.
pub fn is_zero(s: &[u8]) -> bool {
    let mut words = s.chunks_exact(8);
    words.all(|w| w.iter().fold(0u8, |a, &b| a | b) == 0) && words.remainder().iter().all(|&b| b == 0)
}

/// [`is_zero`] for mapped bytes, read with volatile loads (the memory is the page cache, not
/// ours: see [`crate::backend::mapping`]).
fn mapped_is_zero(m: Mapped<'_>) -> bool {
    let p = m.as_ptr();
    let words = m.len() / 8;
    // SAFETY: every read is inside the `m.len()` readable bytes of `m`; unaligned reads are
    // used since nothing promises alignment.
    unsafe {
        (0..words).all(|w| ptr::read_volatile(p.add(w * 8).cast::<[u8; 8]>()) == [0; 8])
            && (words * 8..m.len()).all(|b| ptr::read_volatile(p.add(b)) == 0)
    }
}

/// AWS-LC XTS contexts alive in the whole process, over every cipher (templates, idle and in
/// use), plus one per wide-engine cipher (its schedules). Each holds a key schedule; zero
/// means no volume key schedule is left. Reported by `nbdcrypt status` so an operator (and
/// the suspend test) can see that a suspend really freed them.
static LIVE_CONTEXTS: AtomicUsize = AtomicUsize::new(0);

/// The number of key-schedule holders (AWS-LC XTS contexts, wide-engine schedules) alive in
/// this process (see `LIVE_CONTEXTS`).
pub fn live_contexts() -> usize {
    LIVE_CONTEXTS.load(Ordering::Relaxed)
}

/// Encrypt or decrypt: picks the EVP entry points (and the wide path's schedule). The two
/// directions need separate contexts, because the data-key schedule differs (AES encryption
/// vs decryption round keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    Encrypt,
    Decrypt,
}

/// `EVP_EncryptInit_ex` / `EVP_DecryptInit_ex`.
type InitFn = unsafe extern "C" fn(
    *mut ffi::EVP_CIPHER_CTX,
    *const ffi::EVP_CIPHER,
    *mut ffi::ENGINE,
    *const u8,
    *const u8,
) -> c_int;

/// `EVP_EncryptUpdate` / `EVP_DecryptUpdate`.
type UpdateFn = unsafe extern "C" fn(*mut ffi::EVP_CIPHER_CTX, *mut u8, *mut c_int, *const u8, c_int) -> c_int;

impl Direction {
    fn init(self) -> (InitFn, &'static str) {
        match self {
            Direction::Encrypt => (ffi::EVP_EncryptInit_ex, "EVP_EncryptInit_ex"),
            Direction::Decrypt => (ffi::EVP_DecryptInit_ex, "EVP_DecryptInit_ex"),
        }
    }

    fn update(self) -> (UpdateFn, &'static str) {
        match self {
            Direction::Encrypt => (ffi::EVP_EncryptUpdate, "EVP_EncryptUpdate"),
            Direction::Decrypt => (ffi::EVP_DecryptUpdate, "EVP_DecryptUpdate"),
        }
    }
}

/// One owned `EVP_CIPHER_CTX`, freed (key schedule cleansed) on drop.
struct Ctx {
    ptr: NonNull<ffi::EVP_CIPHER_CTX>,
    live: Arc<AtomicUsize>,
    /// The lock on the key schedule, once there is one; a field, so it is released after
    /// `drop` has freed (and cleansed) the schedule.
    schedule: Option<PageLock>,
}

// SAFETY: an EVP_CIPHER_CTX is plain heap memory with no thread affinity; `Ctx` owns it
// exclusively (never aliased), so moving it to another thread is sound.
unsafe impl Send for Ctx {}

impl Ctx {
    /// A fresh, uninitialised context.
    fn alloc(live: &Arc<AtomicUsize>) -> Result<Ctx, CipherError> {
        // SAFETY: EVP_CIPHER_CTX_new has no preconditions; it returns NULL on allocation
        // failure, which NonNull::new turns into an error.
        let raw = unsafe { ffi::EVP_CIPHER_CTX_new() };
        let ptr = NonNull::new(raw).ok_or_else(|| backend_error("EVP_CIPHER_CTX_new"))?;
        live.fetch_add(1, Ordering::Relaxed);
        LIVE_CONTEXTS.fetch_add(1, Ordering::Relaxed);
        Ok(Ctx { ptr, live: Arc::clone(live), schedule: None })
    }

    /// A context keyed for `dir` with Key1 || Key2 (no IV yet).
    fn keyed(key: &VolumeKey, dir: Direction, live: &Arc<AtomicUsize>) -> Result<Ctx, CipherError> {
        let mut ctx = Ctx::alloc(live)?;
        let (init, name) = dir.init();
        // SAFETY: `ctx.ptr` is a live context we own; EVP_aes_256_xts returns a static
        // cipher; the key pointer is valid for the 64 bytes the cipher reads (key_len = 64);
        // a NULL engine and a NULL IV are allowed (the IV is set per sector).
        let ok = unsafe {
            init(ctx.ptr.as_ptr(), ffi::EVP_aes_256_xts(), ptr::null_mut(), key.expose().as_ptr(), ptr::null())
        };
        if ok != 1 {
            return Err(backend_error(name));
        }
        ctx.lock_schedule();
        Ok(ctx)
    }

    /// A copy of this context, key schedule included.
    fn try_clone(&self) -> Result<Ctx, CipherError> {
        let mut out = Ctx::alloc(&self.live)?;
        // SAFETY: both pointers are live contexts we own and they are distinct; `self` is only
        // read (the XTS copy hook only rewires the copy's key-schedule pointers into the
        // copy's own memory).
        let ok = unsafe { ffi::EVP_CIPHER_CTX_copy(out.ptr.as_ptr(), self.ptr.as_ptr()) };
        if ok != 1 {
            return Err(backend_error("EVP_CIPHER_CTX_copy"));
        }
        out.lock_schedule();
        Ok(out)
    }

    /// The key schedule AWS-LC allocated for this keyed context (null before keying).
    fn schedule_ptr(&self) -> *const u8 {
        // SAFETY: `ptr` is a live context we own; `evp_cipher_ctx_st` is AWS-LC's public
        // struct (bindgen checks its layout), and reading its pointer field does not touch
        // the schedule.
        unsafe { (*self.ptr.as_ptr()).cipher_data as *const u8 }
    }

    /// Locks the key schedule of a context just keyed or copied (see [`XTS_CTX_LEN`]).
    fn lock_schedule(&mut self) {
        let p = self.schedule_ptr();
        if !p.is_null() {
            self.schedule = Some(mlock::lock(p, XTS_CTX_LEN));
        }
    }

    /// Encrypts or decrypts `total` bytes (whole sectors of `ss` bytes, sector i with tweak
    /// first + i) from `src` to `dst`, which are either the same buffer (in place) or do not
    /// overlap. `dst` must be writable and `src` readable for `total` bytes.
    fn crypt_sectors(
        &mut self,
        dir: Direction,
        first: SectorIndex,
        ss: usize,
        src: *const u8,
        dst: *mut u8,
        total: usize,
    ) -> Result<(), CipherError> {
        let len = c_int::try_from(ss).map_err(|_| CipherError::Backend("sector size exceeds c_int"))?;
        let (init, init_name) = dir.init();
        let (update, update_name) = dir.update();
        let ctx = self.ptr.as_ptr();
        for i in 0..total / ss {
            let index = u64::try_from(i).ok().and_then(|i| first.checked_add(i)).ok_or(CipherError::SectorOverflow)?;
            let tweak = index.tweak();
            // SAFETY: `ctx` is a live context keyed for `dir` (a copy of the template), owned
            // exclusively by this call; NULL cipher, engine and key keep the key schedule;
            // `tweak` is 16 readable bytes (the XTS IV length), copied before returning.
            let ok = unsafe { init(ctx, ptr::null(), ptr::null_mut(), ptr::null(), tweak.as_ptr()) };
            if ok != 1 {
                return Err(backend_error(init_name));
            }
            // SAFETY: i * ss + ss <= total, so both offsets stay inside the caller's ranges.
            let (s, d) = unsafe { (src.add(i * ss), dst.add(i * ss)) };
            let mut out_len: c_int = 0;
            // SAFETY: `d` points to `len` writable bytes and `s` to `len` readable ones (the
            // caller's contract); in == out (exact overlap) is allowed for XTS, and the two
            // never partly overlap; `out_len` is a valid c_int. With a block size of 1 the EVP
            // layer buffers nothing, so it writes exactly `len` bytes.
            if unsafe { update(ctx, d, &mut out_len, s, len) } != 1 {
                return Err(backend_error(update_name));
            }
            if out_len != len {
                return Err(CipherError::Backend(update_name));
            }
        }
        Ok(())
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from EVP_CIPHER_CTX_new, is owned only by this value and is
        // freed exactly once, here. EVP_CIPHER_CTX_free cleans up (cleansing the cipher data,
        // i.e. the key schedule) and frees the context.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.ptr.as_ptr()) };
        self.live.fetch_sub(1, Ordering::Relaxed);
        LIVE_CONTEXTS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The contexts of one direction: a template that is never used for data, and idle copies in
/// `SLOTS` lock-free slots.
///
/// Each thread has a home slot (a thread-local *index*, not a context: contexts live only in
/// the pool, so dropping the pool frees them all). A thread that takes from and gives back to
/// its home slot costs one atomic swap and one compare-exchange per request, and threads with
/// different homes touch different cache lines, so callers on several cores do not contend. A
/// miss scans the other slots; only when every slot is empty is a context copied from the
/// template (under a mutex, at most once per concurrent caller).
struct ContextPool {
    template: Mutex<Ctx>,
    slots: Box<[Slot]>,
}

/// An idle context (`Box::into_raw` of a `Ctx`, owned by the slot) or null; on its own cache
/// line (Zen and Intel prefetch line pairs, hence 128 bytes). `AtomicPtr` is `Send + Sync` for
/// any pointee; handing the owned `Ctx` from thread to thread through it is sound because
/// `Ctx: Send`.
#[repr(align(128))]
struct Slot(AtomicPtr<Ctx>);

/// Hands out home-slot numbers to threads, round robin.
static NEXT_HOME: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static HOME: usize = NEXT_HOME.fetch_add(1, Ordering::Relaxed);
}

/// This thread's home slot index, in `0..SLOTS` (0 while thread-locals are being torn down).
fn home() -> usize {
    HOME.try_with(|h| *h).unwrap_or(0) % SLOTS
}

impl ContextPool {
    fn new(key: &VolumeKey, dir: Direction, live: &Arc<AtomicUsize>) -> Result<Self, CipherError> {
        let template = Ctx::keyed(key, dir, live)?;
        // One ready context, so the first request does not pay for a copy.
        let first = Box::new(template.try_clone()?);
        let pool = ContextPool {
            template: Mutex::new(template),
            slots: (0..SLOTS).map(|_| Slot(AtomicPtr::new(ptr::null_mut()))).collect(),
        };
        pool.give(home(), first);
        Ok(pool)
    }

    /// An idle context (from slot `home` first), or a new copy of the template if none is idle.
    fn take(&self, home: usize) -> Result<Box<Ctx>, CipherError> {
        for i in 0..SLOTS {
            let slot = &self.slots[(home + i) % SLOTS].0;
            // A plain load first, so a scan over empty slots does not write to their lines.
            if i > 0 && slot.load(Ordering::Relaxed).is_null() {
                continue;
            }
            let p = slot.swap(ptr::null_mut(), Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: non-null slot values come only from `Box::into_raw` in `give`, and
                // the swap moved ownership out of the slot to this caller alone. Acquire pairs
                // with the Release in `give`, so the context's contents are visible here.
                return Ok(unsafe { Box::from_raw(p) });
            }
        }
        let template = self.template.lock().unwrap_or_else(PoisonError::into_inner);
        template.try_clone().map(Box::new)
    }

    /// Puts a context into a free slot (`home` first), or frees it if every slot is taken.
    fn give(&self, home: usize, ctx: Box<Ctx>) {
        let p = Box::into_raw(ctx);
        for i in 0..SLOTS {
            let slot = &self.slots[(home + i) % SLOTS].0;
            if i > 0 && !slot.load(Ordering::Relaxed).is_null() {
                continue;
            }
            if slot.compare_exchange(ptr::null_mut(), p, Ordering::Release, Ordering::Relaxed).is_ok() {
                return;
            }
        }
        // SAFETY: `p` came from `Box::into_raw` above and was not stored in any slot (every
        // compare-exchange failed), so this is its only owner.
        drop(unsafe { Box::from_raw(p) });
    }

    /// The key schedules of the template and the idle contexts (racy; for tests).
    #[cfg(test)]
    fn schedules(&self) -> Vec<*const u8> {
        let mut v = vec![self.template.lock().unwrap().schedule_ptr()];
        for s in self.slots.iter() {
            let p = s.0.load(Ordering::Acquire);
            if !p.is_null() {
                // SAFETY: a test-only peek at an idle context while no thread takes from the
                // pool (the test owns the cipher).
                v.push(unsafe { &*p }.schedule_ptr());
            }
        }
        v
    }

    /// Number of idle contexts (racy; for tests).
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.slots.iter().filter(|s| !s.0.load(Ordering::Relaxed).is_null()).count()
    }
}

impl Drop for ContextPool {
    fn drop(&mut self) {
        for slot in self.slots.iter_mut() {
            let p = std::mem::replace(slot.0.get_mut(), ptr::null_mut());
            if !p.is_null() {
                // SAFETY: `&mut self` means no other thread can reach the slot; its non-null
                // value came from `Box::into_raw` in `give` and is owned by the slot alone.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

/// Clears AWS-LC's thread-local error queue (so a failure leaves nothing behind for the next
/// unrelated AWS-LC user on this thread) and names the failed call.
fn backend_error(call: &'static str) -> CipherError {
    // SAFETY: ERR_clear_error has no preconditions; it only touches this thread's queue.
    unsafe { ffi::ERR_clear_error() };
    CipherError::Backend(call)
}

/// Encryption throughput in bytes per second of a fresh cipher with a random key, encrypting
/// one `request`-byte buffer (rounded down to whole sectors, at least one sector, at most
/// 64 MiB) over and over for about `duration` (at least one call). Like `cryptsetup benchmark`,
/// it measures the cipher alone, in memory. Returns 0.0 if no cipher could be built.
pub fn measure_throughput(sector_size: SectorSize, request: usize, duration: Duration) -> f64 {
    let Ok(key) = VolumeKey::generate() else {
        return 0.0;
    };
    let Ok(cipher) = SectorCipher::new(&key, sector_size) else {
        return 0.0;
    };
    drop(key);
    let ss = sector_size.bytes_usize();
    let request = request.clamp(ss, MAX_BENCH_REQUEST) / ss * ss;
    let sectors = (request / ss) as u64;
    let mut buf = vec![0u8; request];
    // Warm-up: page in the buffer and the code.
    if cipher.encrypt(SectorIndex(0), &mut buf).is_err() {
        return 0.0;
    }
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut sector = 0u64;
    loop {
        if cipher.encrypt(SectorIndex(sector), &mut buf).is_err() {
            return 0.0;
        }
        bytes += request as u64;
        // Walk the volume like sequential I/O would; wrap long before overflow.
        sector = (sector + sectors) % (1 << 40);
        let elapsed = start.elapsed();
        if elapsed >= duration {
            return bytes as f64 / elapsed.as_secs_f64().max(1e-9);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::crypto::xts_soft::SoftXts;

    fn random_bytes(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        aws_lc_rs::rand::fill(&mut v).unwrap();
        v
    }

    fn random_u64() -> u64 {
        u64::from_le_bytes(random_bytes(8).try_into().unwrap())
    }

    /// IEEE 1619-2007 Annex B, vectors 10-14: Key1 = e digits, Key2 = pi digits.
    const IEEE_KEY: &str = concat!(
        "2718281828459045235360287471352662497757247093699959574966967627",
        "3141592653589793238462643383279502884197169399375105820974944592",
    );

    /// One 512-byte XTS-AES-256 known answer; the plaintext is bytes 00..ff twice.
    struct Kat {
        vector: u32,
        /// Data unit sequence number (the tweak, little-endian).
        dusn: u64,
        ciphertext: &'static str,
    }

    const KATS: [Kat; 5] = [
        Kat {
            vector: 10,
            dusn: 0xff,
            ciphertext: concat!(
                "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b5d31e276f8fe4a8d66b317f9ac683f44",
                "680a86ac35adfc3345befecb4bb188fd5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0",
                "c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca2a3e7a7d7df7b10355165c8b9a6d0a7d",
                "e8b062c4500dc4cd120c0f7418dae3d0b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f",
                "93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec583e9645e07b8d9670655ba5bbcfecc6",
                "dc3966380ad8fecb17b6ba02469a020a84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1",
                "505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae9be69a2ffeceb1bec9de244fbe15992b",
                "11b77c040f12bd8f6a975a44a0f90c29a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac",
                "6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f645e8b7e9bfdef33943054ff84011493",
                "c27b3429eaedb4ed5376441a77ed43851ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa",
                "773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
            ),
        },
        Kat {
            vector: 11,
            dusn: 0xffff,
            ciphertext: concat!(
                "77a31251618a15e6b92d1d66dffe7b50b50bad552305ba0217a610688eff7e11e1d0225438e093242d6db274fde801d4",
                "cae06f2092c728b2478559df58e837c2469ee4a4fa794e4bbc7f39bc026e3cb72c33b0888f25b4acf56a2a9804f1ce6d",
                "3d6e1dc6ca181d4b546179d55544aa7760c40d06741539c7e3cd9d2f6650b2013fd0eeb8c2b8e3d8d240ccae2d4c9832",
                "0a7442e1c8d75a42d6e6cfa4c2eca1798d158c7aecdf82490f24bb9b38e108bcda12c3faf9a21141c3613b58367f922a",
                "aa26cd22f23d708dae699ad7cb40a8ad0b6e2784973dcb605684c08b8d6998c69aac049921871ebb65301a4619ca80ec",
                "b485a31d744223ce8ddc2394828d6a80470c092f5ba413c3378fa6054255c6f9df4495862bbb3287681f931b687c888a",
                "bf844dfc8fc28331e579928cd12bd2390ae123cf03818d14dedde5c0c24c8ab018bfca75ca096f2d531f3d1619e785f1",
                "ada437cab92e980558b3dce1474afb75bfedbf8ff54cb2618e0244c9ac0d3c66fb51598cd2db11f9be39791abe447c63",
                "094f7c453b7ff87cb5bb36b7c79efb0872d17058b83b15ab0866ad8a58656c5a7e20dbdf308b2461d97c0ec0024a2715",
                "055249cf3b478ddd4740de654f75ca686e0d7345c69ed50cdc2a8b332b1f8824108ac937eb050585608ee734097fc090",
                "54fbff89eeaeea791f4a7ab1f9868294a4f9e27b42af8100cb9d59cef9645803",
            ),
        },
        Kat {
            vector: 12,
            dusn: 0xffffff,
            ciphertext: concat!(
                "e387aaa58ba483afa7e8eb469778317ecf4cf573aa9d4eac23f2cdf914e4e200a8b490e42ee646802dc6ee2b471b2781",
                "95d60918ececb44bf79966f83faba0499298ebc699c0c8634715a320bb4f075d622e74c8c932004f25b41e361025b5a8",
                "7815391f6108fc4afa6a05d9303c6ba68a128a55705d415985832fdeaae6c8e19110e84d1b1f199a2692119edc961326",
                "58f09da7c623efcec712537a3d94c0bf5d7e352ec94ae5797fdb377dc1551150721adf15bd26a8efc2fcaad56881fa9e",
                "62462c28f30ae1ceaca93c345cf243b73f542e2074a705bd2643bb9f7cc79bb6e7091ea6e232df0f9ad0d6cf50232787",
                "6d82207abf2115cdacf6d5a48f6c1879a65b115f0f8b3cb3c59d15dd8c769bc014795a1837f3901b5845eb491adfefe0",
                "97b1fa30a12fc1f65ba22905031539971a10f2f36c321bb51331cdefb39e3964c7ef079994f5b69b2edd83a71ef54997",
                "1ee93f44eac3938fcdd61d01fa71799da3a8091c4c48aa9ed263ff0749df95d44fef6a0bb578ec69456aa5408ae32c7a",
                "f08ad7ba8921287e3bbee31b767be06a0e705c864a769137df28292283ea81a2480241b44d9921cdbec1bc28dc1fda11",
                "4bd8e5217ac9d8ebafa720e9da4f9ace231cc949e5b96fe76ffc21063fddc83a6b8679c00d35e09576a875305bed5f36",
                "ed242c8900dd1fa965bc950dfce09b132263a1eef52dd6888c309f5a7d712826",
            ),
        },
        Kat {
            vector: 13,
            dusn: 0xffffffff,
            ciphertext: concat!(
                "bf53d2dade78e822a4d949a9bc6766b01b06a8ef70d26748c6a7fc36d80ae4c5520f7c4ab0ac8544424fa405162fef5a",
                "6b7f229498063618d39f0003cb5fb8d1c86b643497da1ff945c8d3bedeca4f479702a7a735f043ddb1d6aaade3c4a0ac",
                "7ca7f3fa5279bef56f82cd7a2f38672e824814e10700300a055e1630b8f1cb0e919f5e942010a416e2bf48cb46993d3c",
                "b6a51c19bacf864785a00bc2ecff15d350875b246ed53e68be6f55bd7e05cfc2b2ed6432198a6444b6d8c247fab941f5",
                "69768b5c429366f1d3f00f0345b96123d56204c01c63b22ce78baf116e525ed90fdea39fa469494d3866c31e05f295ff",
                "21fea8d4e6e13d67e47ce722e9698a1c1048d68ebcde76b86fcf976eab8aa9790268b7068e017a8b9b749409514f1053",
                "027fd16c3786ea1bac5f15cb79711ee2abe82f5cf8b13ae73030ef5b9e4457e75d1304f988d62dd6fc4b94ed38ba831d",
                "a4b7634971b6cd8ec325d9c61c00f1df73627ed3745a5e8489f3a95c69639c32cd6e1d537a85f75cc844726e8a72fc00",
                "77ad22000f1d5078f6b866318c668f1ad03d5a5fced5219f2eabbd0aa5c0f460d183f04404a0d6f469558e81fab24a16",
                "7905ab4c7878502ad3e38fdbe62a41556cec37325759533ce8f25f367c87bb5578d667ae93f9e2fd99bcbc5f2fbba88c",
                "f6516139420fcff3b7361d86322c4bd84c82f335abb152c4a93411373aaa8220",
            ),
        },
        Kat {
            vector: 14,
            dusn: 0xffffffffff,
            ciphertext: concat!(
                "64497e5a831e4a932c09be3e5393376daa599548b816031d224bbf50a818ed2350eae7e96087c8a0db51ad290bd00c1a",
                "c1620857635bf246c176ab463be30b808da548081ac847b158e1264be25bb0910bbc92647108089415d45fab1b3d2604",
                "e8a8eff1ae4020cfa39936b66827b23f371b92200be90251e6d73c5f86de5fd4a950781933d79a28272b782a2ec313ef",
                "dfcc0628f43d744c2dc2ff3dcb66999b50c7ca895b0c64791eeaa5f29499fb1c026f84ce5b5c72ba1083cddb5ce45434",
                "631665c333b60b11593fb253c5179a2c8db813782a004856a1653011e93fb6d876c18366dd8683f53412c0c180f9c848",
                "592d593f8609ca736317d356e13e2bff3a9f59cd9aeb19cd482593d8c46128bb32423b37a9adfb482b99453fbe25a41b",
                "f6feb4aa0bef5ed24bf73c762978025482c13115e4015aac992e5613a3b5c2f685b84795cb6e9b2656d8c88157e52c42",
                "f978d8634c43d06fea928f2822e465aa6576e9bf419384506cc3ce3c54ac1a6f67dc66f3b30191e698380bc999b05abc",
                "e19dc0c6dcc2dd001ec535ba18deb2df1a101023108318c75dc98611a09dc48a0acdec676fabdf222f07e026f059b672",
                "b56e5cbc8e1d21bbd867dd927212054681d70ea737134cdfce93b6f82ae22423274e58a0821cc5502e2d0ab4585e94de",
                "6975be5e0b4efce51cd3e70c25a1fbbbd609d273ad5b0d59631c531f6a0a57b9",
            ),
        },
    ];

    fn ieee_plaintext() -> Vec<u8> {
        (0..512u32).map(|i| i as u8).collect()
    }

    fn ieee_key() -> VolumeKey {
        VolumeKey::from_slice(&hex::decode(IEEE_KEY).unwrap()).unwrap()
    }

    fn soft(key: &VolumeKey) -> SoftXts {
        SoftXts::new(key.expose())
    }

    /// Both engines where the CPU has the wide one (tests that run on each).
    fn engines() -> Vec<CipherEngine> {
        if CipherEngine::wide_supported() {
            vec![CipherEngine::AwsLc, CipherEngine::Wide]
        } else {
            eprintln!("this CPU lacks VAES/AVX-512: the wide engine is not tested here");
            vec![CipherEngine::AwsLc]
        }
    }

    /// Every engine with both sector sizes.
    fn cases() -> Vec<(CipherEngine, SectorSize)> {
        engines().into_iter().flat_map(|e| [(e, SectorSize::S512), (e, SectorSize::S4096)]).collect()
    }

    /// A cipher on `engine`, checked to really be on it.
    fn on(engine: CipherEngine, key: &VolumeKey, size: SectorSize) -> SectorCipher {
        let c = SectorCipher::with_engine(key, size, engine).unwrap();
        assert_eq!(c.engine(), engine);
        c
    }

    #[test]
    fn ieee1619_vectors_encrypt() {
        for engine in engines() {
            let cipher = on(engine, &ieee_key(), SectorSize::S512);
            for kat in &KATS {
                let mut buf = ieee_plaintext();
                cipher.encrypt(SectorIndex(kat.dusn), &mut buf).unwrap();
                assert_eq!(hex::encode(&buf), kat.ciphertext, "IEEE 1619 vector {}, {engine}", kat.vector);
            }
        }
    }

    #[test]
    fn ieee1619_vectors_decrypt() {
        for engine in engines() {
            let cipher = on(engine, &ieee_key(), SectorSize::S512);
            for kat in &KATS {
                let mut buf = hex::decode(kat.ciphertext).unwrap();
                cipher.decrypt(SectorIndex(kat.dusn), &mut buf).unwrap();
                assert_eq!(buf, ieee_plaintext(), "IEEE 1619 vector {}, {engine}", kat.vector);
            }
        }
    }

    #[test]
    fn engines_agree_on_random_keys_sectors_and_lengths() {
        if !CipherEngine::wide_supported() {
            return;
        }
        for size in [SectorSize::S512, SectorSize::S4096] {
            let ss = size.bytes_usize();
            for round in 0..24usize {
                let key = VolumeKey::generate().unwrap();
                let (aws, wide) = (on(CipherEngine::AwsLc, &key, size), on(CipherEngine::Wide, &key, size));
                // 1..=9 sectors (the wide path takes four at a time), some ending at the top.
                let n = 1 + round % 9;
                let first = if round % 4 == 0 { u64::MAX - n as u64 } else { random_u64() };
                let first = SectorIndex(first.min(u64::MAX - n as u64));
                let plain = random_bytes(n * ss);
                let (mut a, mut w) = (plain.clone(), plain.clone());
                aws.encrypt(first, &mut a).unwrap();
                wide.encrypt(first, &mut w).unwrap();
                assert_eq!(a, w, "encrypt, {n} sectors of {ss} at {first:?}");
                let mut out = vec![0u8; w.len()];
                wide.decrypt_mapped(first, Mapped::of_slice(&a), &mut out).unwrap();
                assert_eq!(out, plain, "decrypt, {n} sectors of {ss} at {first:?}");
            }
        }
    }

    #[test]
    fn preferred_engine_is_wide_where_the_cpu_has_it() {
        let want = if CipherEngine::wide_supported() && !aws_lc_requested() {
            CipherEngine::Wide
        } else {
            CipherEngine::AwsLc
        };
        for size in [SectorSize::S512, SectorSize::S4096] {
            assert_eq!(CipherEngine::preferred(), want);
            assert_eq!(SectorCipher::new(&VolumeKey::generate().unwrap(), size).unwrap().engine(), want);
        }
    }

    #[test]
    fn soft_reference_matches_ieee1619_vectors() {
        let reference = soft(&ieee_key());
        for kat in &KATS {
            let mut buf = ieee_plaintext();
            reference.encrypt(SectorIndex(kat.dusn), 512, &mut buf);
            assert_eq!(hex::encode(&buf), kat.ciphertext, "IEEE 1619 vector {}", kat.vector);
        }
    }

    fn assert_matches_soft(size: SectorSize) {
        for engine in engines() {
            assert_engine_matches_soft(engine, size);
        }
    }

    fn assert_engine_matches_soft(engine: CipherEngine, size: SectorSize) {
        let ss = size.bytes_usize();
        for sectors in [1usize, 2, 7, 32] {
            let key = VolumeKey::generate().unwrap();
            let cipher = on(engine, &key, size);
            let first = SectorIndex(random_u64() >> 8);
            let plain = random_bytes(sectors * ss);

            let mut ours = plain.clone();
            cipher.encrypt(first, &mut ours).unwrap();
            let mut theirs = plain.clone();
            soft(&key).encrypt(first, ss, &mut theirs);
            assert_eq!(ours, theirs, "encrypt, {engine}, {sectors} sectors of {ss} at {first:?}");

            cipher.decrypt(first, &mut ours).unwrap();
            soft(&key).decrypt(first, ss, &mut theirs);
            assert_eq!(ours, plain, "decrypt, {engine}, {sectors} sectors of {ss} at {first:?}");
            assert_eq!(theirs, plain);
        }
    }

    #[test]
    fn matches_soft_reference_with_512_byte_sectors() {
        assert_matches_soft(SectorSize::S512);
    }

    #[test]
    fn matches_soft_reference_with_4096_byte_sectors() {
        assert_matches_soft(SectorSize::S4096);
    }

    #[test]
    fn decrypt_inverts_encrypt() {
        for (engine, size) in cases() {
            let cipher = on(engine, &VolumeKey::generate().unwrap(), size);
            let plain = random_bytes(16 * size.bytes_usize());
            let mut buf = plain.clone();
            cipher.encrypt(SectorIndex(5), &mut buf).unwrap();
            assert_ne!(buf, plain);
            cipher.decrypt(SectorIndex(5), &mut buf).unwrap();
            assert_eq!(buf, plain, "{engine}, sector size {size}");
        }
    }

    #[test]
    fn zero_sectors_read_as_zeros_only_when_enabled() {
        for (engine, size) in cases() {
            let ss = size.bytes_usize();
            let key = VolumeKey::generate().unwrap();
            let plain = random_bytes(6 * ss);
            let mut raw = plain.clone();
            on(engine, &key, size).encrypt(SectorIndex(7), &mut raw).unwrap();
            // Raw sectors 1, 2 and 5 were never written (a sparse target): zeros.
            for i in [1, 2, 5] {
                raw[i * ss..(i + 1) * ss].fill(0);
            }
            let mut want = plain.clone();
            for i in [1, 2, 5] {
                want[i * ss..(i + 1) * ss].fill(0);
            }
            let mut got = raw.clone();
            on(engine, &key, size).with_zero_sectors(true).decrypt(SectorIndex(7), &mut got).unwrap();
            assert_eq!(got, want, "{engine}, sector size {size}");
            // Without the flag a zero sector decrypts like any other: to noise.
            let mut noise = raw.clone();
            on(engine, &key, size).decrypt(SectorIndex(7), &mut noise).unwrap();
            assert_ne!(&noise[ss..2 * ss], &want[ss..2 * ss]);
            assert_eq!(&noise[..ss], &plain[..ss]);
        }
    }

    #[test]
    fn decrypt_mapped_equals_decrypt_in_place_with_and_without_zero_sectors() {
        for (engine, size) in cases() {
            let ss = size.bytes_usize();
            let key = VolumeKey::generate().unwrap();
            let mut raw = random_bytes(8 * ss);
            on(engine, &key, size).encrypt(SectorIndex(3), &mut raw).unwrap();
            for i in [0, 4, 5] {
                raw[i * ss..(i + 1) * ss].fill(0);
            }
            for zero in [false, true] {
                let cipher = on(engine, &key, size).with_zero_sectors(zero);
                let mut want = raw.clone();
                cipher.decrypt(SectorIndex(3), &mut want).unwrap();
                let mut got = vec![0xa5; raw.len()];
                cipher.decrypt_mapped(SectorIndex(3), Mapped::of_slice(&raw), &mut got).unwrap();
                assert_eq!(got, want, "{engine}, sector size {size}, zero sectors {zero}");
            }
            let cipher = on(engine, &key, size);
            let mut short = vec![0; ss];
            assert!(matches!(
                cipher.decrypt_mapped(SectorIndex(0), Mapped::of_slice(&raw), &mut short),
                Err(CipherError::LengthMismatch { .. })
            ));
        }
    }

    #[test]
    fn one_call_equals_sector_by_sector() {
        for (engine, size) in cases() {
            let ss = size.bytes_usize();
            let cipher = on(engine, &VolumeKey::generate().unwrap(), size);
            let plain = random_bytes(8 * ss);
            let first = SectorIndex(1000);

            let mut whole = plain.clone();
            cipher.encrypt(first, &mut whole).unwrap();
            let mut piecewise = plain.clone();
            for (i, sector) in piecewise.chunks_exact_mut(ss).enumerate() {
                cipher.encrypt(SectorIndex(first.0 + i as u64), sector).unwrap();
            }
            assert_eq!(whole, piecewise, "{engine}, sector size {size}");
        }
    }

    #[test]
    fn equal_sectors_at_different_indices_differ() {
        let cipher = SectorCipher::new(&VolumeKey::generate().unwrap(), SectorSize::S512).unwrap();
        let mut buf = vec![0x42u8; 1024];
        cipher.encrypt(SectorIndex(0), &mut buf).unwrap();
        assert_ne!(buf[..512], buf[512..]);
    }

    #[test]
    fn equal_key_halves_are_refused() {
        let key = VolumeKey::from_slice(&[0x11; 64]).unwrap();
        let err = SectorCipher::new(&key, SectorSize::S512).unwrap_err();
        assert!(matches!(err, CipherError::EqualKeyHalves), "{err:?}");
    }

    #[test]
    fn unaligned_length_is_refused_and_buffer_untouched() {
        let cipher = SectorCipher::new(&VolumeKey::generate().unwrap(), SectorSize::S4096).unwrap();
        for len in [16usize, 512, 4097, 8191] {
            let mut buf = vec![7u8; len];
            let err = cipher.encrypt(SectorIndex(0), &mut buf).unwrap_err();
            assert!(matches!(err, CipherError::UnalignedBuffer { len: l, sector_size: 4096 } if l == len), "{err:?}");
            assert!(cipher.decrypt(SectorIndex(0), &mut buf).is_err());
            assert!(buf.iter().all(|&b| b == 7));
        }
    }

    #[test]
    fn overflowing_sector_range_is_refused() {
        let cipher = SectorCipher::new(&VolumeKey::generate().unwrap(), SectorSize::S512).unwrap();
        let mut one = vec![0u8; 512];
        let mut two = vec![0u8; 1024];
        assert!(matches!(cipher.encrypt(SectorIndex(u64::MAX), &mut one), Err(CipherError::SectorOverflow)));
        assert!(matches!(cipher.decrypt(SectorIndex(u64::MAX - 1), &mut two), Err(CipherError::SectorOverflow)));
    }

    #[test]
    fn highest_sector_index_is_accepted() {
        let key = VolumeKey::generate().unwrap();
        let cipher = SectorCipher::new(&key, SectorSize::S512).unwrap();
        let mut ours = random_bytes(512);
        let mut theirs = ours.clone();
        cipher.encrypt(SectorIndex(u64::MAX - 1), &mut ours).unwrap();
        soft(&key).encrypt(SectorIndex(u64::MAX - 1), 512, &mut theirs);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn empty_buffer_is_ok() {
        let cipher = SectorCipher::new(&VolumeKey::generate().unwrap(), SectorSize::S512).unwrap();
        cipher.encrypt(SectorIndex(3), &mut []).unwrap();
        cipher.decrypt(SectorIndex(u64::MAX), &mut []).unwrap();
    }

    #[test]
    fn debug_prints_no_key_bytes() {
        let mut bytes = [0xABu8; 64];
        bytes[32..].fill(0xCD);
        let cipher = SectorCipher::new(&VolumeKey::from_slice(&bytes).unwrap(), SectorSize::S512).unwrap();
        let s = format!("{cipher:?}");
        assert!(s.starts_with("SectorCipher { sector_size: 512"), "{s}");
        for needle in ["171", "205", "ab", "AB", "cd", "CD", "["] {
            assert!(!s.contains(needle), "{s}");
        }
    }

    #[test]
    fn cipher_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SectorCipher>();
    }

    #[test]
    fn concurrent_callers_agree_with_a_single_caller() {
        let key = VolumeKey::generate().unwrap();
        let cipher = SectorCipher::new(&key, SectorSize::S512).unwrap();
        let plain = random_bytes(8 * 512);
        let mut expected = plain.clone();
        soft(&key).encrypt(SectorIndex(77), 512, &mut expected);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let mut buf = plain.clone();
                        cipher.encrypt(SectorIndex(77), &mut buf).unwrap();
                        assert_eq!(buf, expected);
                        cipher.decrypt(SectorIndex(77), &mut buf).unwrap();
                        assert_eq!(buf, plain);
                    }
                });
            }
        });
    }

    #[test]
    fn dropping_the_cipher_frees_every_context() {
        for engine in engines() {
            let cipher = on(engine, &VolumeKey::generate().unwrap(), SectorSize::S512);
            std::thread::scope(|s| {
                for _ in 0..4 {
                    s.spawn(|| {
                        let mut buf = vec![0u8; 4096];
                        for i in 0..100 {
                            cipher.encrypt(SectorIndex(i), &mut buf).unwrap();
                        }
                    });
                }
            });
            let live = cipher.live_counter();
            match engine {
                // Two templates and at least one idle copy per direction.
                CipherEngine::AwsLc => assert!(live.load(Ordering::Relaxed) >= 4),
                // One set of schedules, whatever the callers.
                CipherEngine::Wide => assert_eq!(live.load(Ordering::Relaxed), 1),
            }
            drop(cipher);
            assert_eq!(live.load(Ordering::Relaxed), 0, "{engine}");
        }
    }

    #[test]
    fn pool_keeps_at_most_one_context_per_slot() {
        let live = Arc::new(AtomicUsize::new(0));
        let pool = ContextPool::new(&VolumeKey::generate().unwrap(), Direction::Encrypt, &live).unwrap();
        let taken: Vec<Box<Ctx>> = (0..SLOTS + 5).map(|i| pool.take(i % SLOTS).unwrap()).collect();
        assert_eq!(pool.idle(), 0);
        assert_eq!(live.load(Ordering::Relaxed), SLOTS + 6);
        for ctx in taken {
            pool.give(0, ctx);
        }
        assert_eq!(pool.idle(), SLOTS);
        assert_eq!(live.load(Ordering::Relaxed), SLOTS + 1);
        drop(pool);
        assert_eq!(live.load(Ordering::Relaxed), 0);
    }

    /// Whether `needle` (a raw AES-256 key) starts a key schedule inside `hay`: the AES-NI
    /// schedule stores the key's bytes as they are, the portable one as big-endian words.
    fn holds_schedule_of(hay: &[u8], needle: &[u8]) -> bool {
        let swapped: Vec<u8> = needle.chunks(4).flat_map(|w| w.iter().rev().copied()).collect();
        hay.windows(needle.len()).any(|w| w == needle || w == swapped.as_slice())
    }

    #[test]
    fn key_schedules_are_in_locked_memory() {
        let key = VolumeKey::generate().unwrap();
        let cipher = on(CipherEngine::AwsLc, &key, SectorSize::S4096);
        let Engine::AwsLc { enc, dec } = &cipher.engine else { unreachable!("built on AWS-LC") };
        for (pool, both) in [(enc, true), (dec, false)] {
            let schedules = pool.schedules();
            assert!(schedules.len() >= 2, "a template and one idle copy");
            for p in schedules {
                assert!(!p.is_null());
                // SAFETY: a live context's cipher data, XTS_CTX_LEN bytes (what this checks:
                // the key schedules lie inside that length).
                let data = unsafe { std::slice::from_raw_parts(p, XTS_CTX_LEN) };
                // Key2 (the tweak key) is always an encryption schedule; Key1 only in an
                // encrypting context.
                assert!(holds_schedule_of(data, &key.expose()[32..]), "tweak-key schedule outside XTS_CTX_LEN");
                if both {
                    assert!(holds_schedule_of(data, &key.expose()[..32]), "data-key schedule outside XTS_CTX_LEN");
                }
                for addr in [p as usize, p as usize + XTS_CTX_LEN - 1] {
                    assert!(mlock::kernel_says_locked(addr), "key schedule at {addr:#x} is not mlocked");
                }
            }
        }
    }

    #[test]
    fn measure_throughput_reports_a_positive_rate() {
        let rate = measure_throughput(SectorSize::S4096, 65536, Duration::from_millis(20));
        assert!(rate > 0.0, "{rate}");
    }
}
