//! Mixing a batch's targets allocates nothing once its output buffer has grown: it runs every
//! training step, for every image (`Supervision` promises no allocation per batch). Counted by a
//! global allocator that counts this thread's allocations while asked to.

use datasets::mix::{draw, Mix};
use rand::SeedableRng;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.with(Cell::get) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations(f: impl FnOnce()) -> usize {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|c| c.set(true));
    f();
    COUNTING.with(|c| c.set(false));
    COUNT.with(Cell::get)
}

#[test]
fn mixing_targets_allocates_nothing_once_grown() {
    let (n, k) = (128, 10);
    let rows: Vec<f32> = (0..n * k)
        .map(|i| (i % k == i / k % k) as u8 as f32)
        .collect();
    let mixes = [
        Mix::Mixup { alpha: 1.0 },
        Mix::Cutmix { beta: 1.0, p: 1.0 },
        Mix::Ricap { beta: 0.3 },
    ];
    for mix in mixes {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let record = draw(&mix, n, (32, 32), &mut rng);
        let mut out = Vec::new();
        record.mix_rows(&rows, k, &mut out);
        let sum: f32 = out.iter().sum();
        assert!((sum - n as f32).abs() < 1e-3, "{mix:?}: rows sum to {sum}");
        let count = allocations(|| record.mix_rows(&rows, k, &mut out));
        assert_eq!(count, 0, "{mix:?}: {count} allocations in one batch");
    }
}

/// Rendering an image's view (the loader does it for every image of every batch) allocates
/// nothing after the first image: a random resized crop's boxes differ in size from image to
/// image, and the worker's buffers are sized for the largest at once.
#[test]
fn rendering_views_allocates_nothing_once_grown() {
    use datasets::view::{View, ViewScratch};
    let (c, h, w) = (3, 40, 48);
    let src: Vec<u8> = (0..c * h * w).map(|i| (i * 37 % 256) as u8).collect();
    for view in [View::random_resized(24), View::Center { side: 32 }] {
        let mut scratch = ViewScratch::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        view.render(&src, (c, h, w), &mut rng, &mut scratch);
        let count = allocations(|| {
            for _ in 0..200 {
                view.render(&src, (c, h, w), &mut rng, &mut scratch);
            }
        });
        assert_eq!(count, 0, "{view:?}: {count} allocations in 200 images");
    }
}
