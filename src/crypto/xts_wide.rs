//! AES-256-XTS over many sectors per call, on VAES + AVX-512: the sector cipher's fast path
//! where the CPU has it (Intel Ice Lake and later, AMD Zen 4 and later).
//!
//! Why our own: AWS-LC's XTS takes one data unit (sector) per call and starts each with a
//! serial AES of the tweak, which with 512-byte sectors makes the pass about 60% dearer per
//! byte than with 4096 (the README's profiles). Here the tweaks of four sectors are encrypted
//! in one 512-bit AES, and each sector's 32 blocks go through AES eight registers (four blocks
//! each) at a time, so the AES units stay fed whatever the sector size.
//!
//! The AES itself is the CPU's (`VAESENC`/`VAESDEC`, constant time); this module only lays
//! out the XTS around it: the block tweaks `T·αʲ` are computed four lanes at a time, by byte
//! shifts and a carry-less multiply for the reduction (x¹²⁸ = x⁷ + x² + x + 1), and each
//! group's tweaks are ready before its AES starts. Sector `i` uses tweak `first + i` as 16
//! little-endian bytes (plain64), exactly as the AWS-LC path; the tests check both agree bit
//! for bit, the IEEE 1619 vectors and the RustCrypto reference.
//!
//! Key material: the three AES-256 key schedules (Key1 forward and inverse, Key2 forward) are
//! one [`Secret`] (locked, zeroized on drop), read by the AES instructions from there. In an
//! optimised build no round key is copied to the stack (a release-mode test looks for them);
//! during a call they pass through vector registers, as with any AES implementation.

#![allow(unsafe_code)]

use std::arch::x86_64::*;

use crate::crypto::secret::{Secret, VolumeKey};
use crate::crypto::xts::Direction;

/// AES-256 rounds; a schedule holds `ROUNDS + 1` round keys.
const ROUNDS: usize = 14;
const SCHEDULE: usize = (ROUNDS + 1) * 16;
/// Key1 forward, Key1 inverse (for decryption), Key2 forward (for tweaks).
const KEYS: usize = 3 * SCHEDULE;
/// A schedule with each round key repeated in the four lanes of a 512-bit register.
type Broadcast = [__m512i; ROUNDS + 1];
/// The three schedules broadcast, plus room to align them to 64 bytes.
const WIDE_KEYS: usize = 3 * size_of::<Broadcast>() + 64;
/// Bytes one group of eight 512-bit registers covers (32 AES blocks). Sector sizes are
/// multiples of it.
const GROUP: usize = 512;

/// Key schedules for the wide path. Only built where [`WideXts::supported`] is true.
///
/// The round keys are kept broadcast (each in all four lanes), so the AES instructions read
/// them from this locked allocation, loaded where used ([`round_key`]). Broadcast per call,
/// or loaded once and kept, they were spilled to the stack frame (neither locked nor wiped).
pub(super) struct WideXts {
    keys: Secret<WIDE_KEYS>,
    /// Offset of the first 64-byte-aligned byte of `keys`.
    start: usize,
}

impl WideXts {
    /// Whether this CPU runs the wide path.
    pub(super) fn supported() -> bool {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("vaes")
            && std::arch::is_x86_feature_detected!("vpclmulqdq")
    }

    /// Expands `key` (Key1 || Key2); `None` where the CPU lacks the instructions.
    pub(super) fn new(key: &VolumeKey) -> Option<WideXts> {
        if !Self::supported() {
            return None;
        }
        let mut compact = Secret::<KEYS>::zeroed();
        let (k1, k2) = key.expose().split_at(32);
        let (enc, rest) = compact.expose_mut().split_at_mut(SCHEDULE);
        let (dec, tweak) = rest.split_at_mut(SCHEDULE);
        // SAFETY: `supported()` checked AES-NI; every slice has the length the function
        // writes (one schedule) and the keys are 32 bytes.
        unsafe {
            expand(k1, enc);
            invert(enc, dec);
            expand(k2, tweak);
        }
        let mut keys = Secret::<WIDE_KEYS>::zeroed();
        let start = keys.expose().as_ptr().align_offset(64);
        let out = &mut keys.expose_mut()[start..start + 3 * size_of::<Broadcast>()];
        for (round, wide) in compact.expose().chunks_exact(16).zip(out.chunks_exact_mut(64)) {
            for lane in wide.chunks_exact_mut(16) {
                lane.copy_from_slice(round);
            }
        }
        Some(WideXts { keys, start })
    }

    /// Schedule `i`: 0 Key1 forward, 1 Key1 inverse, 2 Key2 forward.
    fn schedule(&self, i: usize) -> &Broadcast {
        let bytes = &self.keys.expose()[self.start + i * size_of::<Broadcast>()..][..size_of::<Broadcast>()];
        // SAFETY: the slice is exactly one `Broadcast` long (the indexing above panics
        // otherwise), starts 64-byte aligned (`start`, plus whole multiples of 64), and every
        // bit pattern is a valid `__m512i`; the borrow ties it to `self`.
        unsafe { &*bytes.as_ptr().cast::<Broadcast>() }
    }

    /// Encrypts or decrypts `total` bytes, whole sectors of `ss` bytes (a multiple of 512),
    /// sector i with tweak `first + i`, from `src` into `dst`.
    ///
    /// # Safety
    /// `src` must be readable and `dst` writable for `total` bytes, and the two either equal
    /// (in place) or not overlapping; `total` a multiple of `ss`, `ss` a non-zero multiple of
    /// 512, and `first + total / ss` must not overflow.
    pub(super) unsafe fn crypt(
        &self,
        dir: Direction,
        first: u64,
        ss: usize,
        src: *const u8,
        dst: *mut u8,
        total: usize,
    ) {
        debug_assert!(ss != 0 && ss.is_multiple_of(GROUP) && total.is_multiple_of(ss));
        let tweak = self.schedule(2);
        // SAFETY: `new` only builds a WideXts where `supported()` holds, so the target
        // features are present; the pointer contract is the caller's.
        unsafe {
            match dir {
                Direction::Encrypt => crypt_sectors::<false>(self.schedule(0), tweak, first, ss, src, dst, total),
                Direction::Decrypt => crypt_sectors::<true>(self.schedule(1), tweak, first, ss, src, dst, total),
            }
        }
    }
}

/// `k ^ k<<32 ^ k<<64 ^ k<<96 ^ t`: one word of the AES key expansion.
#[target_feature(enable = "aes")]
fn mix(k: __m128i, t: __m128i) -> __m128i {
    let mut k = k;
    let mut s = _mm_slli_si128::<4>(k);
    k = _mm_xor_si128(k, s);
    s = _mm_slli_si128::<4>(s);
    k = _mm_xor_si128(k, s);
    s = _mm_slli_si128::<4>(s);
    _mm_xor_si128(_mm_xor_si128(k, s), t)
}

/// The AES-256 forward key schedule of `key` (32 bytes) into `out` (240 bytes).
#[target_feature(enable = "aes")]
unsafe fn expand(key: &[u8], out: &mut [u8]) {
    assert!(key.len() == 32 && out.len() == SCHEDULE);
    // SAFETY: the lengths are asserted above; unaligned loads and stores.
    unsafe {
        let mut a = _mm_loadu_si128(key.as_ptr().cast());
        let mut b = _mm_loadu_si128(key.as_ptr().add(16).cast());
        let mut put = |i: usize, v: __m128i| _mm_storeu_si128(out.as_mut_ptr().add(16 * i).cast(), v);
        put(0, a);
        put(1, b);
        macro_rules! round {
            ($rcon:literal, $i:literal) => {
                a = mix(a, _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b)));
                put($i, a);
                if $i < ROUNDS {
                    b = mix(b, _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a)));
                    put($i + 1, b);
                }
            };
        }
        round!(0x01, 2);
        round!(0x02, 4);
        round!(0x04, 6);
        round!(0x08, 8);
        round!(0x10, 10);
        round!(0x20, 12);
        round!(0x40, 14);
        let _ = (a, b);
    }
}

/// The schedule for the equivalent inverse cipher (`AESDEC`): round keys reversed, the inner
/// ones through InvMixColumns.
#[target_feature(enable = "aes")]
unsafe fn invert(enc: &[u8], dec: &mut [u8]) {
    assert!(enc.len() == SCHEDULE && dec.len() == SCHEDULE);
    for i in 0..=ROUNDS {
        // SAFETY: i <= ROUNDS, so both 16-byte accesses are inside the asserted lengths.
        unsafe {
            let k = _mm_loadu_si128(enc.as_ptr().add(16 * (ROUNDS - i)).cast());
            let k = if i == 0 || i == ROUNDS { k } else { _mm_aesimc_si128(k) };
            _mm_storeu_si128(dec.as_mut_ptr().add(16 * i).cast(), k);
        }
    }
}

/// Each 128-bit lane of `x` times α⁸ᴹ in GF(2¹²⁸) (XTS convention: little-endian, x¹²⁸ =
/// x⁷ + x² + x + 1); `N` is 16 − M (a const expression cannot say so), 1 ≤ M ≤ 7.
///
/// Whole-byte shifts run on a different execution port than the AES instructions, where
/// bit shifts would take turns with them, hence tweak steps of α⁸ rather than α⁴.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn mul_alpha_bytes<const M: i32, const N: i32>(x: __m512i) -> __m512i {
    debug_assert!(M + N == 16 && (1..=7).contains(&M));
    let shifted = _mm512_bslli_epi128::<M>(x);
    // The top M bytes of each lane, brought down and reduced: at most 8M + 7 < 64 bits.
    let top = _mm512_bsrli_epi128::<N>(x);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(top, _mm512_set1_epi64(0x87));
    _mm512_xor_si512(shifted, reduced)
}

/// `[T·αᴷ, T·αᴷ⁺¹, T·αᴷ⁺², T·αᴷ⁺³]` from `T` in every lane of `t`, for K = 0 or 4 (`counts`
/// holds the bit shifts K..K+3 per 64-bit half, two halves per lane).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn four_from(t: __m512i, counts: __m512i) -> __m512i {
    let shifted = _mm512_sllv_epi64(t, counts);
    // What each half shifted out (a count of 64 yields zero).
    let out = _mm512_srlv_epi64(t, _mm512_sub_epi64(_mm512_set1_epi64(64), counts));
    // The low half's overflow moves into the high half; the high half's is reduced.
    let into_high = _mm512_bslli_epi128::<8>(out);
    let carry = _mm512_bsrli_epi128::<8>(out);
    let reduced = _mm512_clmulepi64_epi128::<0x00>(carry, _mm512_set1_epi64(0x87));
    _mm512_ternarylogic_epi64::<0x96>(shifted, into_high, reduced)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn crypt_sectors<const DECRYPT: bool>(
    k: &Broadcast,
    kt: &Broadcast,
    first: u64,
    ss: usize,
    src: *const u8,
    dst: *mut u8,
    total: usize,
) {
    let counts0 = _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0);
    let counts4 = _mm512_set_epi64(7, 7, 6, 6, 5, 5, 4, 4);
    let groups = ss / GROUP;
    let sectors = total / ss;
    // The tweaks of four sectors from `i0` on, in one AES. Lanes past the last sector are
    // computed and unused (wrapping: the caller guarantees only the used indices do not
    // overflow).
    let four_tweaks = |i0: u64| {
        let idx = |j: u64| i0.wrapping_add(j) as i64;
        let mut t = _mm512_xor_si512(_mm512_set_epi64(0, idx(3), 0, idx(2), 0, idx(1), 0, idx(0)), round_key(kt, 0));
        for r in 1..ROUNDS {
            t = _mm512_aesenc_epi128(t, round_key(kt, r));
        }
        _mm512_aesenclast_epi128(t, round_key(kt, ROUNDS))
    };
    // Lane j of a batch of four tweaks, in every lane.
    let pair = _mm512_set_epi64(1, 0, 1, 0, 1, 0, 1, 0);
    let lane = |batch: __m512i, j: usize| {
        _mm512_permutexvar_epi64(_mm512_add_epi64(pair, _mm512_set1_epi64(2 * j as i64)), batch)
    };
    let mut batch = four_tweaks(first);
    let t0 = lane(batch, 0);
    let (mut even, mut odd) = (four_from(t0, counts0), four_from(t0, counts4));
    let mut tweaks = group_tweaks(even, odd);
    let mut off = 0;
    for sector in 0..sectors {
        for g in 0..groups {
            // The next group's tweaks are computed before this group's AES, so their short
            // serial chains (and every fourth sector the tweak AES) overlap it.
            if g + 1 < groups {
                even = mul_alpha_bytes::<4, 12>(even);
                odd = mul_alpha_bytes::<4, 12>(odd);
            } else if sector + 1 < sectors {
                let j = (sector + 1) % 4;
                if j == 0 {
                    batch = four_tweaks(first.wrapping_add(sector as u64 + 1));
                }
                let t0 = lane(batch, j);
                (even, odd) = (four_from(t0, counts0), four_from(t0, counts4));
            }
            let next = group_tweaks(even, odd);
            // SAFETY: off + GROUP <= total, inside the caller's ranges.
            unsafe { crypt_group::<DECRYPT>(k, &tweaks, src.add(off), dst.add(off)) };
            tweaks = next;
            off += GROUP;
        }
    }
}

/// Round key `r` of `k`, read from the locked schedule where it is used: a volatile load the
/// compiler may not hoist out of the loop. Hoisted, the keys did not fit in registers beside
/// the data and tweaks and were spilled to the stack, which is neither locked nor wiped.
#[inline(always)]
fn round_key(k: &Broadcast, r: usize) -> __m512i {
    // SAFETY: `&k[r]` is a valid, aligned, initialised `__m512i`.
    unsafe { std::ptr::read_volatile(&k[r]) }
}

/// The tweaks of a group's eight registers (register r: blocks 4r..4r+3, T·α⁴ʳ) from those of
/// its blocks 0..3 (`even`) and 4..7 (`odd`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vpclmulqdq")]
fn group_tweaks(even: __m512i, odd: __m512i) -> [__m512i; 8] {
    [
        even,
        odd,
        mul_alpha_bytes::<1, 15>(even),
        mul_alpha_bytes::<1, 15>(odd),
        mul_alpha_bytes::<2, 14>(even),
        mul_alpha_bytes::<2, 14>(odd),
        mul_alpha_bytes::<3, 13>(even),
        mul_alpha_bytes::<3, 13>(odd),
    ]
}

/// One group: 32 blocks from `src` to `dst` with the tweaks `t` (see [`group_tweaks`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,vaes,vpclmulqdq")]
unsafe fn crypt_group<const DECRYPT: bool>(k: &Broadcast, t: &[__m512i; 8], src: *const u8, dst: *mut u8) {
    let key = |r: usize| round_key(k, r);
    let mut x = [_mm512_setzero_si512(); 8];
    for r in 0..8 {
        // SAFETY: r * 64 + 64 <= GROUP bytes, readable by the caller's contract; every load
        // happens before any store, so in-place calls read the plaintext.
        let p = unsafe { _mm512_loadu_si512(src.add(64 * r).cast()) };
        x[r] = _mm512_ternarylogic_epi64::<0x96>(p, t[r], key(0));
    }
    for round in 1..ROUNDS {
        let k = key(round);
        for v in &mut x {
            *v = if DECRYPT { _mm512_aesdec_epi128(*v, k) } else { _mm512_aesenc_epi128(*v, k) };
        }
    }
    let k = key(ROUNDS);
    for r in 0..8 {
        let last = if DECRYPT { _mm512_aesdeclast_epi128(x[r], k) } else { _mm512_aesenclast_epi128(x[r], k) };
        // SAFETY: as for the loads, writable by the caller's contract.
        unsafe { _mm512_storeu_si512(dst.add(64 * r).cast(), _mm512_xor_si512(last, t[r])) };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap is a failed test
mod tests {
    use super::*;
    use crate::crypto::mlock;

    #[test]
    fn schedules_hold_the_key_in_locked_memory() {
        if !WideXts::supported() {
            return;
        }
        let key = VolumeKey::generate().unwrap();
        let wide = WideXts::new(&key).unwrap();
        let lanes = |s: usize, r: usize| -> [u8; 64] {
            // SAFETY: `[u8; 64]` and `__m512i` have the same size; any bits are valid bytes.
            unsafe { std::mem::transmute(wide.schedule(s)[r]) }
        };
        let key = key.expose();
        // An AES-256 schedule starts with the key itself: Key1 forward, Key2 forward; each
        // round key in all four lanes.
        for (s, half) in [(0, &key[..32]), (2, &key[32..])] {
            assert_eq!(lanes(s, 0), *[&half[..16]; 4].concat());
            assert_eq!(lanes(s, 1), *[&half[16..]; 4].concat());
        }
        // The inverse schedule starts with Key1's last round key and ends with its first.
        assert_eq!(lanes(1, 0), lanes(0, ROUNDS));
        assert_eq!(lanes(1, ROUNDS), lanes(0, 0));
        assert!(wide.keys.is_locked());
        let bytes = wide.keys.expose();
        for addr in [bytes.as_ptr() as usize, bytes.as_ptr() as usize + WIDE_KEYS - 1] {
            assert!(mlock::kernel_says_locked(addr), "schedule at {addr:#x} is not mlocked");
        }
    }

    /// Expands `key`, then encrypts and decrypts `buf`, 16 KiB further down the stack than
    /// the caller's next callee will reach, so what those frames leave behind is still there
    /// afterwards.
    #[inline(never)]
    fn expand_and_crypt_deep(key: &VolumeKey, buf: &mut [u8]) -> WideXts {
        let pad = std::hint::black_box([0u8; 16 << 10]);
        let wide = WideXts::new(key).unwrap();
        for dir in [Direction::Encrypt, Direction::Decrypt] {
            // SAFETY: in place over a buffer of whole 512-byte sectors.
            unsafe { wide.crypt(dir, 9, 512, buf.as_ptr(), buf.as_mut_ptr(), buf.len()) };
        }
        std::hint::black_box(&pad);
        wide
    }

    /// The `len` bytes of this thread's stack below the caller's frame, read through
    /// `/proc/self/mem` (reading dead stack memory directly would be undefined behaviour).
    #[inline(never)]
    fn stack_below_caller(len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let marker = 0u8;
        let top = std::hint::black_box(&marker) as *const u8 as usize;
        let mut out = vec![0u8; len];
        let mem = std::fs::File::open("/proc/self/mem").unwrap();
        mem.read_exact_at(&mut out, (top - len) as u64).unwrap();
        out
    }

    #[test]
    #[cfg_attr(
        debug_assertions,
        ignore = "an unoptimised build keeps every value on the stack; tests/run.sh runs this with --release"
    )]
    fn round_keys_are_not_left_on_the_stack() {
        if !WideXts::supported() {
            return;
        }
        let key = VolumeKey::generate().unwrap();
        let mut buf = vec![0x3cu8; 8 * 512];
        let wide = expand_and_crypt_deep(&key, &mut buf);
        let stack = stack_below_caller(64 << 10);
        // Round keys derived from the key (not the key's own halves: forward rounds 0 and 1,
        // inverse round 14), one lane each.
        let mut derived = Vec::new();
        for s in 0..3 {
            for r in 0..=ROUNDS {
                let raw = (s != 1 && r < 2) || (s == 1 && r == ROUNDS);
                if !raw {
                    // SAFETY: `[u8; 64]` and `__m512i` have the same size; any bits are bytes.
                    let lanes: [u8; 64] = unsafe { std::mem::transmute(wide.schedule(s)[r]) };
                    derived.push(lanes[..16].to_vec());
                }
            }
        }
        for (i, k) in derived.iter().enumerate() {
            assert!(!stack.windows(16).any(|w| w == k.as_slice()), "round key {i} found on the stack");
        }
    }

    #[test]
    fn alpha_powers_agree_with_single_steps() {
        if !WideXts::supported() {
            return;
        }
        // T·α by the textbook rule: shift left one bit, fold bit 128 back as 0x87.
        fn times_alpha(t: u128) -> u128 {
            (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 }
        }
        let t0 = u128::MAX - 0x1234_5678_9abc_def0_0fed_cba9_8765_4321;
        let mut want = [t0; 40];
        for j in 1..40 {
            want[j] = times_alpha(want[j - 1]);
        }
        let lanes = |v: __m512i| -> [u128; 4] {
            let mut out = [0u128; 4];
            // SAFETY: `out` is 64 writable bytes.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), v) };
            out
        };
        // SAFETY: supported() checked the target features.
        unsafe {
            let t = _mm512_broadcast_i32x4(_mm_loadu_si128((&t0 as *const u128).cast()));
            let first = four_from(t, _mm512_set_epi64(3, 3, 2, 2, 1, 1, 0, 0));
            assert_eq!(lanes(first), [want[0], want[1], want[2], want[3]]);
            let second = four_from(t, _mm512_set_epi64(7, 7, 6, 6, 5, 5, 4, 4));
            assert_eq!(lanes(second), [want[4], want[5], want[6], want[7]]);
            assert_eq!(lanes(mul_alpha_bytes::<1, 15>(second)), [want[12], want[13], want[14], want[15]]);
            assert_eq!(lanes(mul_alpha_bytes::<3, 13>(first)), [want[24], want[25], want[26], want[27]]);
            assert_eq!(lanes(mul_alpha_bytes::<4, 12>(second)), [want[36], want[37], want[38], want[39]]);
        }
    }
}
