//! Key memory is wiped before it is freed (issue 8, item 3), checked in a controlled way: this
//! test binary's global allocator looks, in every block at the moment it is deallocated (the
//! memory is still valid then, so reading it is sound), for the secrets of the test. Any hit
//! is a heap copy of key material that went back to the allocator without being zeroized.
//!
//! Needles: the four 16-byte quarters of the volume key and the two halves of the KEK, so any
//! fragment of 31 bytes or more of either is found wherever it sits in a block. They live in
//! static atomics, never on the heap. Reallocation goes through the default `realloc` (alloc,
//! copy, dealloc), so a Vec that grew is checked too.
//!
//! Covered: the real code paths of loading a KEK file, generating and wrapping a volume key
//! (format), unwrapping it (unlock), deriving the header MAC and key digest, building the
//! sector cipher, encrypting and decrypting through an export, and dropping it all. Not
//! covered: stack copies (never freed), and memory AWS-LC allocates in C (`OPENSSL_malloc`,
//! not this allocator; AWS-LC's `OPENSSL_free` cleanses every block itself).

#![allow(unsafe_code)]
#![allow(clippy::unwrap_used)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use nbdcrypt::backend::{Backend, MemBackend};
use nbdcrypt::crypto::VolumeKey;
use nbdcrypt::export::ExportOptions;
use nbdcrypt::header::KeySlot;
use nbdcrypt::keys::{local::LocalProvider, BoxFuture, EncryptionContext, KeyError, KeyProvider, Wrapped};
use nbdcrypt::units::SectorSize;

const NEEDLES: usize = 6;
/// Each needle: 16 bytes as two little-endian u64 words.
static NEEDLE: [[AtomicU64; 2]; NEEDLES] = [const { [AtomicU64::new(0), AtomicU64::new(0)] }; NEEDLES];
static ACTIVE: [AtomicBool; NEEDLES] = [const { AtomicBool::new(false) }; NEEDLES];
static ARMED: AtomicBool = AtomicBool::new(false);
static HITS: AtomicUsize = AtomicUsize::new(0);
static HIT_SIZE: AtomicUsize = AtomicUsize::new(0);
static SCANNED_BLOCKS: AtomicUsize = AtomicUsize::new(0);
static SCANNED_BYTES: AtomicUsize = AtomicUsize::new(0);

struct Watch;

fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

/// Looks for an active needle in `block`; counts a hit per block.
fn scan(block: &[u8]) {
    let mut firsts = [(0u64, 0u64, false); NEEDLES];
    for (i, f) in firsts.iter_mut().enumerate() {
        *f = (
            NEEDLE[i][0].load(Ordering::Relaxed),
            NEEDLE[i][1].load(Ordering::Relaxed),
            ACTIVE[i].load(Ordering::Relaxed),
        );
    }
    SCANNED_BLOCKS.fetch_add(1, Ordering::Relaxed);
    SCANNED_BYTES.fetch_add(block.len(), Ordering::Relaxed);
    for pos in 0..=block.len() - 16 {
        let w0 = word(&block[pos..]);
        for &(a, b, on) in &firsts {
            if on && w0 == a && word(&block[pos + 8..]) == b {
                HITS.fetch_add(1, Ordering::Relaxed);
                HIT_SIZE.store(block.len(), Ordering::Relaxed);
                return;
            }
        }
    }
}

// SAFETY: every call is forwarded to the system allocator with the same arguments; `dealloc`
// only reads the block it is given, which is valid for `layout.size()` bytes until it is
// handed to `System.dealloc`, and allocates nothing itself.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::Acquire) && layout.size() >= 16 && layout.size() <= 4 << 20 {
            // SAFETY: see the impl comment: `ptr` is a live block of `layout.size()` bytes.
            scan(unsafe { std::slice::from_raw_parts(ptr, layout.size()) });
        }
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Watch = Watch;

/// Watches `secret` (a multiple of 16 bytes) in needle slots `first..`.
fn watch(first: usize, secret: &[u8]) {
    for (i, chunk) in secret.chunks(16).enumerate() {
        NEEDLE[first + i][0].store(word(chunk), Ordering::Relaxed);
        NEEDLE[first + i][1].store(word(&chunk[8..]), Ordering::Relaxed);
        ACTIVE[first + i].store(true, Ordering::Release);
    }
}

/// The local provider, except that `generate` tells the allocator the new key before it is
/// wrapped (the default `generate` does the same two steps).
struct Watching(LocalProvider);

impl KeyProvider for Watching {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn key_id(&self) -> &str {
        self.0.key_id()
    }

    fn wrap<'a>(&'a self, key: &'a VolumeKey, c: &'a EncryptionContext) -> BoxFuture<'a, Result<Wrapped, KeyError>> {
        self.0.wrap(key, c)
    }

    fn unwrap<'a>(&'a self, slot: &'a KeySlot) -> BoxFuture<'a, Result<VolumeKey, KeyError>> {
        self.0.unwrap(slot)
    }

    fn generate<'a>(&'a self, context: &'a EncryptionContext) -> BoxFuture<'a, Result<(VolumeKey, Wrapped), KeyError>> {
        Box::pin(async move {
            let key = VolumeKey::generate().map_err(|_| KeyError::Random)?;
            watch(0, key.expose());
            let wrapped = self.0.wrap(&key, context).await?;
            Ok((key, wrapped))
        })
    }
}

#[test]
fn no_heap_block_holds_key_material_when_it_is_freed() {
    // Control: the detector sees a copy of a watched secret freed without wiping.
    let control = [0x3cu8; 16];
    watch(4, &control);
    ARMED.store(true, Ordering::Release);
    drop(std::hint::black_box(control.to_vec()));
    ARMED.store(false, Ordering::Release);
    assert_eq!(HITS.swap(0, Ordering::Relaxed), 1, "the detector missed a freed copy");
    ACTIVE[4].store(false, Ordering::Relaxed);

    // A KEK file of known bytes (read back into a stack buffer: no heap copy here).
    let dir = tempfile::tempdir().unwrap();
    let kek_path = dir.path().join("k.kek");
    let written = nbdcrypt::keys::local::generate_kek_file(&kek_path).unwrap();
    drop(written);
    let mut kek = [0u8; 32];
    std::fs::File::open(&kek_path).unwrap().read_exact(&mut kek).unwrap();
    watch(4, &kek);
    kek.fill(0);
    ARMED.store(true, Ordering::Release);

    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let mem = Arc::new(MemBackend::new(8 << 20));
    {
        let provider = Watching(LocalProvider::load(&kek_path).unwrap());
        rt.block_on(nbdcrypt::commands::format_backend(mem.as_ref(), &provider, SectorSize::S4096, Vec::new()))
            .unwrap();
    }
    {
        let providers: Vec<Box<dyn KeyProvider>> = vec![Box::new(LocalProvider::load(&kek_path).unwrap())];
        let backend: Arc<dyn Backend> = mem.clone();
        let unlocked = rt.block_on(nbdcrypt::volume::unlock_backend(backend, &providers)).unwrap();
        let opts =
            ExportOptions { name: "z".into(), description: String::new(), read_only: false, allow_discards: false };
        let (export, _) = nbdcrypt::volume::into_export(unlocked, opts).unwrap();
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        export.write(65536, &mut data.clone(), true).unwrap();
        export.write(100, &mut [7u8; 5000], false).unwrap();
        let mut back = vec![0u8; 65536];
        export.read(65536, &mut back).unwrap();
        assert!(back == data, "the export does not read back what it wrote");
    }
    drop(rt);
    ARMED.store(false, Ordering::Release);
    let (hits, size) = (HITS.load(Ordering::Relaxed), HIT_SIZE.load(Ordering::Relaxed));
    let (blocks, bytes) = (SCANNED_BLOCKS.load(Ordering::Relaxed), SCANNED_BYTES.load(Ordering::Relaxed));
    eprintln!("[zeroize] scanned {blocks} freed blocks ({bytes} bytes), {hits} held key material");
    assert!(ACTIVE[0].load(Ordering::Relaxed), "the volume key was never watched");
    assert!(blocks > 100, "too few deallocations scanned to mean anything");
    assert_eq!(hits, 0, "{hits} freed heap blocks held key material (last one {size} bytes)");
}
