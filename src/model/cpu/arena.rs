//! Memory for weights that the kernels stream at full speed: one anonymous mapping, advised into
//! 2 MiB transparent huge pages (the TLB then reaches 512x further, which lifted the read
//! bandwidth of two cores from ~30 to ~50 GB/s on the machines we measured). Where huge pages are
//! unavailable the advice is ignored by the kernel and normal pages are used.

use std::marker::PhantomData;

use anyhow::{bail, Result};

const HUGE_PAGE: usize = 2 << 20;
const ALIGN: usize = 64;

/// How weight memory is obtained (`Huge` unless measuring).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Anonymous memory advised into transparent huge pages.
    Huge,
    /// Anonymous memory on normal 4 KiB pages.
    Normal,
}

impl Placement {
    /// `ZAGREUS_HUGEPAGES=0` turns huge pages off.
    pub fn from_env() -> Self {
        match std::env::var("ZAGREUS_HUGEPAGES").as_deref() {
            Ok("0") | Ok("off") | Ok("no") => Placement::Normal,
            _ => Placement::Huge,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Placement::Huge => "huge pages",
            Placement::Normal => "4 KiB pages",
        }
    }
}

/// A typed piece of an arena (an offset, so the arena can be shared read-only afterwards).
/// Offsets are always 64-byte aligned and every access is bounds-checked against the arena it is
/// used with, so a region given to the wrong arena reads wrong numbers, never out of bounds.
#[derive(Debug)]
pub struct Region<T> {
    offset: usize,
    len: usize,
    _t: PhantomData<T>,
}

impl<T> Clone for Region<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Region<T> {}

impl<T> Region<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A zero-initialised, huge-page-aligned buffer with a bump allocator for `Region`s.
pub struct Arena {
    base: *mut libc::c_void,
    mapped: usize,
    start: *mut u8,
    capacity: usize,
    used: usize,
    placement: Placement,
}

// SAFETY: the arena owns its mapping; after building it is only read through shared references.
unsafe impl Send for Arena {}
unsafe impl Sync for Arena {}

/// Marker for plain-old-data element types stored in an arena.
pub trait Pod: Copy + Send + Sync + 'static {}
impl Pod for u8 {}
impl Pod for i8 {}
impl Pod for u16 {}
impl Pod for f32 {}
impl Pod for half::bf16 {}
impl Pod for half::f16 {}

impl Arena {
    /// Maps `capacity` bytes (plus alignment slack).
    pub fn new(capacity: usize, placement: Placement) -> Result<Self> {
        let mapped = capacity.max(1).div_ceil(HUGE_PAGE) * HUGE_PAGE + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping, checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!(
                "cannot allocate {} MB for the weights: {}",
                capacity >> 20,
                std::io::Error::last_os_error()
            );
        }
        let aligned = (base as usize).div_ceil(HUGE_PAGE) * HUGE_PAGE;
        if placement == Placement::Huge {
            // SAFETY: the range lies inside the mapping; failure (no THP support) is harmless.
            unsafe {
                libc::madvise(
                    aligned as *mut libc::c_void,
                    mapped - (aligned - base as usize),
                    libc::MADV_HUGEPAGE,
                )
            };
        }
        Ok(Self {
            base,
            mapped,
            start: aligned as *mut u8,
            capacity,
            used: 0,
            placement,
        })
    }

    pub fn placement(&self) -> Placement {
        self.placement
    }

    /// Bytes handed out.
    pub fn used(&self) -> usize {
        self.used
    }

    /// Reserves `len` zeroed elements.
    pub fn alloc<T: Pod>(&mut self, len: usize) -> Result<Region<T>> {
        // Pod types are at most 4-byte aligned, so 64-byte offsets suit every one of them.
        let offset = self.used.div_ceil(ALIGN) * ALIGN;
        let end = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_add(offset))
            .filter(|end| *end <= self.capacity);
        let Some(end) = end else {
            bail!(
                "internal error: weight arena overflow ({len} more elements, {} of {} bytes used)",
                self.used,
                self.capacity
            );
        };
        self.used = end;
        Ok(Region {
            offset,
            len,
            _t: PhantomData,
        })
    }

    /// Panics unless `r` lies within what this arena has handed out (its offset is aligned by
    /// construction).
    fn check<T>(&self, r: &Region<T>) {
        assert!(
            r.len * std::mem::size_of::<T>() <= self.used.saturating_sub(r.offset),
            "arena: a region outside this arena"
        );
    }

    pub fn get<T: Pod>(&self, r: Region<T>) -> &[T] {
        self.check(&r);
        // SAFETY: regions of this arena come from `alloc`: in bounds and aligned for T.
        unsafe { std::slice::from_raw_parts(self.start.add(r.offset) as *const T, r.len) }
    }

    pub fn get_mut<T: Pod>(&mut self, r: Region<T>) -> &mut [T] {
        self.check(&r);
        // SAFETY: as in `get`, and `&mut self` makes the borrow exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.start.add(r.offset) as *mut T, r.len) }
    }

    /// Two regions at once (regions from `alloc` never overlap).
    pub fn get_pair_mut<A: Pod, B: Pod>(&mut self, a: Region<A>, b: Region<B>) -> (&mut [A], &mut [B]) {
        self.check(&a);
        self.check(&b);
        assert!(
            a.offset + a.len * std::mem::size_of::<A>() <= b.offset
                || b.offset + b.len * std::mem::size_of::<B>() <= a.offset
        );
        // SAFETY: in bounds and aligned (from `alloc`), and disjoint (checked above).
        unsafe {
            (
                std::slice::from_raw_parts_mut(self.start.add(a.offset) as *mut A, a.len),
                std::slice::from_raw_parts_mut(self.start.add(b.offset) as *mut B, b.len),
            )
        }
    }

    /// A shareable writer for filling disjoint parts of the arena from several threads.
    pub fn writer(&mut self) -> ArenaWriter<'_> {
        ArenaWriter {
            used: self.used,
            start: self.start,
            _arena: PhantomData,
        }
    }

    /// Bytes needed for `len` elements of T including alignment padding.
    pub fn size_of<T>(len: usize) -> usize {
        (len * std::mem::size_of::<T>()).div_ceil(ALIGN) * ALIGN
    }
}

/// Parallel write access to an arena while it is being filled (the `&mut Arena` it borrows keeps
/// readers away). Callers guarantee that concurrent writes go to disjoint ranges.
#[derive(Clone, Copy)]
pub struct ArenaWriter<'a> {
    used: usize,
    start: *mut u8,
    _arena: PhantomData<&'a mut Arena>,
}

// SAFETY: writers only hand out the disjoint ranges their callers ask for (see `range_mut`).
unsafe impl Send for ArenaWriter<'_> {}
unsafe impl Sync for ArenaWriter<'_> {}

impl ArenaWriter<'_> {
    /// Elements `from..to` of region `r`.
    ///
    /// # Safety
    /// No other live slice may overlap the same elements.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn range_mut<T: Pod>(&self, r: Region<T>, from: usize, to: usize) -> &mut [T] {
        assert!(
            from <= to && to <= r.len && r.len * std::mem::size_of::<T>() <= self.used.saturating_sub(r.offset),
            "arena range out of bounds"
        );
        std::slice::from_raw_parts_mut((self.start.add(r.offset) as *mut T).add(from), to - from)
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.base, self.mapped) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_aligned_zeroed_and_disjoint() {
        let mut a = Arena::new(
            Arena::size_of::<f32>(10) + Arena::size_of::<u16>(7) + 64,
            Placement::Huge,
        )
        .unwrap();
        let r1 = a.alloc::<f32>(10).unwrap();
        let r2 = a.alloc::<u16>(7).unwrap();
        assert!(a.get(r1).iter().all(|v| *v == 0.0));
        a.get_mut(r1).fill(1.5);
        a.get_mut(r2).fill(7);
        assert!(a.get(r1).iter().all(|v| *v == 1.5));
        assert!(a.get(r2).iter().all(|v| *v == 7));
        assert_eq!(a.get(r2).as_ptr() as usize % 64, 0);
        assert!(a.alloc::<f32>(1 << 20).is_err());
        assert!(a.alloc::<f32>(usize::MAX / 2).is_err());
    }

    #[test]
    #[should_panic(expected = "outside this arena")]
    fn a_region_beyond_another_arena_is_refused() {
        let mut a = Arena::new(1 << 16, Placement::Normal).unwrap();
        let mut b = Arena::new(1 << 16, Placement::Normal).unwrap();
        let _ = b.alloc::<f32>(16).unwrap();
        let r = a.alloc::<f32>(1000).unwrap();
        let _ = b.get(r);
    }
}
