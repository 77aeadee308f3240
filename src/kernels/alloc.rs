//! Allocator tuning for training loops.
//!
//! Every op of a training step allocates its output afresh. glibc serves buffers above
//! 128 KiB (at first) with `mmap` and returns them with `munmap` on free, so each step
//! page-faults its activations in again and pays TLB shoot-downs on every core: measured
//! at ~25% of a tutorial coupling step on 2 cores (`perf record`). Raising the mmap
//! threshold to its 32 MiB maximum and the trim threshold keeps freed activations in the
//! heap for the next step.
//!
//! The activations then live in 4 KiB pages: a 14×14 Glow layer's 9.6 MB tensor is 2,400
//! of them, more than the core's second-level TLB holds, and each op walks the page
//! tables afresh (two-dimensionally, under a hypervisor). [`HugePageAlloc`], the `flowlab`
//! binary's global allocator, asks the kernel for transparent huge pages (2 MiB) for the
//! heap as it grows (in steps of at least [`TOP_PAD`], so the new memory is advised before
//! anything but glibc's chunk headers touches it) and for large blocks outside it.
//!
//! All threads share one arena (the heap): the shards of a training step allocate on
//! threads of their own, and what one thread frees another reuses.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Whether [`HugePageAlloc`] advises huge pages (set by [`tune_allocator`]).
static HUGE_PAGES: AtomicBool = AtomicBool::new(false);
/// The heap (`brk`) range advised so far: from the break when [`tune_allocator`] ran to
/// this end (0 before).
static HEAP_LO: AtomicUsize = AtomicUsize::new(0);
static HEAP_ADVISED: AtomicUsize = AtomicUsize::new(0);

/// The heap grows by at least this much at a time (glibc's `M_TOP_PAD`; virtual memory
/// only until touched).
const TOP_PAD: usize = 64 << 20;
/// Allocations below this size do not check the heap's growth (a tiny allocation that
/// grows it leaves the new memory to the next larger one, which comes before its use).
const CHECK_MIN: usize = 4096;

/// The huge page size on x86-64 and (4 KiB-granule) aarch64 Linux: a block outside the
/// heap is advised when it holds a whole one.
const HUGE_PAGE: usize = 2 << 20;

/// Applies the tuning once per process (glibc on Linux only; a no-op elsewhere). Set
/// `FLOWLAB_MALLOC_TUNING=0` to leave glibc's defaults and 4 KiB pages, or
/// `FLOWLAB_HUGE_PAGES=0` to keep the thresholds but not advise huge pages.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var("FLOWLAB_MALLOC_TUNING").as_deref() == Ok("0") {
            return;
        }
        let huge = std::env::var("FLOWLAB_HUGE_PAGES").as_deref() != Ok("0");
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only adjusts glibc's allocator parameters; it is called once,
        // before the training loop, with documented parameter values.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
            // One arena for all threads: a training step's shards allocate their
            // activations on threads of their own (`train::shard`), and with an arena per
            // thread each kept its own high-water mark beside the main thread's (Glow,
            // batch 64: peak RSS 717 MB against 422 MB in one arena, same step time).
            libc::mallopt(libc::M_ARENA_MAX, 1);
            if huge {
                libc::mallopt(libc::M_TOP_PAD, TOP_PAD as libc::c_int);
                let brk = libc::sbrk(0) as usize;
                if brk != usize::MAX {
                    HEAP_LO.store(brk, Ordering::Relaxed);
                    HEAP_ADVISED.store(brk, Ordering::Relaxed);
                }
            }
        }
        HUGE_PAGES.store(huge, Ordering::Relaxed);
    });
}

/// The system allocator, which (once [`tune_allocator`] has run, on Linux) advises
/// transparent huge pages (`madvise(MADV_HUGEPAGE)`) for the heap's new memory whenever
/// it has grown, and for the whole 2 MiB pages inside each allocation of at least 2 MiB
/// outside the heap (glibc's `mmap`ed blocks, other threads' arenas), before their first
/// use: what `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` does inside glibc. Where the kernel's
/// `transparent_hugepage/enabled` is `madvise` (Debian's default) that is what makes
/// large tensors use 2 MiB pages; with `always` it changes nothing, with `never` the
/// advice is ignored.
///
/// Install it in a binary with `#[global_allocator]`. Measured in session 19 on the 2-core
/// VM (AMD EPYC, kernel 6.18, `enabled` = `madvise`), `flowlab bench … --batch 64`,
/// interleaved rounds, this VM drifting ±10–20 %: 346 of Glow's 385 MB resident in huge
/// pages (190 MB when only blocks of ≥ 2 MiB were advised); against `FLOWLAB_HUGE_PAGES=0`
/// the Glow step faster in 6 of 6 rounds (median 1.06×) of one run and slower in 3 of 3
/// of another, multi-scale faster in 3 of 3 and then 3 of 6, RealNVP in 3 of 3; against
/// the binary without this allocator, Glow faster in 15 of 17 rounds (1.09–1.15× by
/// median). Peak RSS +1–2 MB.
#[derive(Debug, Default, Clone, Copy)]
pub struct HugePageAlloc;

impl HugePageAlloc {
    /// Advises the heap's growth since the last call, or else the whole huge pages of
    /// `[p, p + size)` when that block lies outside the heap.
    #[inline]
    fn advise(p: *mut u8, size: usize) {
        if size < CHECK_MIN || p.is_null() || !HUGE_PAGES.load(Ordering::Relaxed) {
            return;
        }
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: `sbrk(0)` reads glibc's cached break. The advised ranges are the heap's
        // pages between two observed breaks, or lie inside a block this allocator just
        // returned; MADV_HUGEPAGE changes how pages are backed, never their contents, and
        // an error (a kernel without THP, a range trimmed meanwhile) leaves them as they
        // were.
        unsafe {
            let advise = |start: usize, end: usize| {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            };
            let brk = libc::sbrk(0) as usize;
            let done = HEAP_ADVISED.load(Ordering::Relaxed);
            if brk > done
                && brk != usize::MAX
                && HEAP_ADVISED
                    .compare_exchange(done, brk, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                advise(done, brk);
            }
            let (lo, q) = (HEAP_LO.load(Ordering::Relaxed), p as usize);
            if size >= HUGE_PAGE && !(lo..brk).contains(&q) {
                let start = q.next_multiple_of(HUGE_PAGE);
                let end = (q + size) / HUGE_PAGE * HUGE_PAGE;
                if end > start {
                    advise(start, end);
                }
            }
        }
    }
}

// SAFETY: every method forwards to `System` with the same arguments; `advise` only changes
// how pages are backed.
unsafe impl GlobalAlloc for HugePageAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        Self::advise(p, layout.size());
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        Self::advise(p, layout.size());
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        Self::advise(p, new_size);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory from the allocator is usable and keeps its values through a growing
    /// `realloc`, below and above the advice threshold, with advice on.
    #[test]
    fn allocates_reallocates_and_frees_with_advice() {
        tune_allocator();
        let a = HugePageAlloc;
        for size in [64, HUGE_PAGE - 8, HUGE_PAGE, 5 << 20] {
            let layout = Layout::from_size_align(size, 64).unwrap();
            // SAFETY: a non-zero layout; the memory is written and read inside it, then
            // freed with the layout it has.
            unsafe {
                let p = a.alloc(layout);
                assert!(!p.is_null());
                for i in (0..size).step_by(4096) {
                    *p.add(i) = (i / 4096) as u8;
                }
                let z = a.alloc_zeroed(layout);
                assert!((0..size).step_by(4096).all(|i| *z.add(i) == 0));
                a.dealloc(z, layout);
                let q = a.realloc(p, layout, 2 * size + HUGE_PAGE);
                assert!(!q.is_null());
                assert!((0..size)
                    .step_by(4096)
                    .all(|i| *q.add(i) == (i / 4096) as u8));
                *q.add(2 * size + HUGE_PAGE - 1) = 7;
                a.dealloc(
                    q,
                    Layout::from_size_align(2 * size + HUGE_PAGE, 64).unwrap(),
                );
            }
        }
    }

    /// A large block gets the huge-page advice: the kernel lists the mapping holding its
    /// whole 2 MiB pages with the `hg` flag (`MADV_HUGEPAGE`). Whether it then gets huge
    /// pages depends on the kernel's free memory, so that is not asserted. Skipped where
    /// the kernel has no transparent huge pages or the advice is turned off.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn large_blocks_are_advised_for_huge_pages() {
        tune_allocator();
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists()
            || !HUGE_PAGES.load(Ordering::Relaxed)
        {
            return;
        }
        let layout = Layout::from_size_align(8 << 20, 64).unwrap();
        let a = HugePageAlloc;
        // SAFETY: a non-zero layout, freed with the same layout.
        let p = unsafe { a.alloc(layout) };
        assert!(!p.is_null());
        let page = (p as usize).next_multiple_of(HUGE_PAGE);
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut flags = None;
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&page);
                        continue;
                    }
                }
            }
            if inside {
                if let Some(f) = line.strip_prefix("VmFlags:") {
                    flags = Some(f.split_whitespace().map(str::to_owned).collect::<Vec<_>>());
                }
            }
        }
        // SAFETY: allocated above with this layout.
        unsafe { a.dealloc(p, layout) };
        let flags = flags.expect("the block's mapping in /proc/self/smaps");
        assert!(flags.iter().any(|f| f == "hg"), "VmFlags {flags:?}");
    }
}
