//! Work on a slice split over a few scoped threads, answers in order: what
//! ferryctl's parse and the file store's apply use on large inputs.

/// `items` in `k` runs of (nearly) equal length, in order.
pub fn runs<T>(items: &[T], k: usize) -> impl Iterator<Item = &[T]> {
    items.chunks(items.len().div_ceil(k.max(1)).max(1))
}

/// `f` over each of the [`runs`] of `items`, one thread per run (on this
/// thread, over all of `items`, when `k` is 1 or less); the answers in the
/// order of the runs. A panic in a run is raised again here.
pub fn map_runs<T: Sync, R: Send>(items: &[T], k: usize, f: impl Fn(&[T]) -> R + Sync) -> Vec<R> {
    if k <= 1 {
        return vec![f(items)];
    }
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = runs(items, k).map(|p| s.spawn(move || f(p))).collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_cover_the_items_in_order() {
        let items: Vec<u32> = (0..10).collect();
        for k in 0..12 {
            let sums = map_runs(&items, k, |p| p.to_vec());
            assert_eq!(sums.concat(), items, "k = {k}");
            assert!(sums.len() <= k.max(1), "k = {k}");
        }
        assert_eq!(map_runs(&[] as &[u32], 1, |p| p.len()), vec![0]);
    }
}
