//! Back-off for a guest that resets in a loop: a supervisor's restart delay. A boot that ends
//! in a reset within [`QUICK`] of its start is a quick reset; after [`FREE`] quick resets in a
//! row each further one waits, twice as long as the one before ([`FIRST`] up to [`MAX`]). A
//! boot that runs longer than [`QUICK`] clears the count.

use std::time::Duration;

/// A boot shorter than this that ends in a reset counts as a quick reset.
pub const QUICK: Duration = Duration::from_secs(10);
/// Quick resets in a row that re-boot at once.
pub const FREE: u32 = 5;
/// The first delay.
pub const FIRST: Duration = Duration::from_millis(100);
/// The longest delay.
pub const MAX: Duration = Duration::from_secs(10);

/// Counts quick resets in a row.
#[derive(Debug, Default)]
pub struct ResetBackoff {
    quick: u32,
}

impl ResetBackoff {
    /// Records a reset of a boot that ran for `ran`; returns how long to wait before the next
    /// boot (`None`: at once) and the quick resets in a row so far.
    pub fn record(&mut self, ran: Duration) -> (Option<Duration>, u32) {
        if ran >= QUICK {
            self.quick = 0;
        }
        self.quick = self.quick.saturating_add(1);
        if self.quick <= FREE {
            return (None, self.quick);
        }
        let doublings = (self.quick - FREE - 1).min(16);
        (Some((FIRST * (1 << doublings)).min(MAX)), self.quick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_resets_back_off_and_a_long_boot_clears_the_count() {
        let mut b = ResetBackoff::default();
        let fast = Duration::from_millis(5);
        for i in 1..=FREE {
            assert_eq!(b.record(fast), (None, i));
        }
        let delays: Vec<_> = (0..10).map(|_| b.record(fast).0.unwrap()).collect();
        assert_eq!(delays[0], FIRST);
        assert_eq!(delays[1], FIRST * 2);
        assert_eq!(delays[2], FIRST * 4);
        assert_eq!(*delays.last().unwrap(), MAX);
        assert!(delays.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(
            b.record(QUICK),
            (None, 1),
            "a long boot starts the count anew"
        );
    }
}
