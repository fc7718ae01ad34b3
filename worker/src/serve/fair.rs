//! Which waiting requests get the batch's free rows (docs/serving.md, "Operation": admission).
//! Rows are handed out one at a time, each to the waiting request that holds the fewest rows
//! now, the oldest on a tie: a request is admitted sequence by sequence as rows free, a short
//! request arriving behind a big one gets the next free row instead of waiting for the big one's
//! whole admission, and requests holding equal shares take turns (round-robin by request). A
//! request holding more than another never gets a row before it, so none starves: max-min
//! fairness over the batch's rows.

/// A waiting request, as the share sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    /// Rows its sequences hold in the batch now (admitted, not finished).
    pub held: usize,
    /// Its sequences not yet admitted.
    pub left: usize,
}

/// How many of `free` rows each of `waiting` (oldest first) gets: one row at a time to the
/// request holding the fewest (rows held plus rows given so far), the oldest on a tie, never more
/// than it has left. Rows no request wants stay free.
pub fn share(free: usize, waiting: &[Want]) -> Vec<usize> {
    let mut given = vec![0; waiting.len()];
    for _ in 0..free {
        let next = (0..waiting.len()).filter(|&i| given[i] < waiting[i].left).min_by_key(|&i| (waiting[i].held + given[i], i));
        let Some(i) = next else { break };
        given[i] += 1;
    }
    given
}

#[cfg(test)]
mod tests {
    use super::*;

    fn want(held: usize, left: usize) -> Want {
        Want { held, left }
    }

    #[test]
    fn a_lone_request_takes_every_free_row_it_can_use() {
        assert_eq!(share(3, &[want(0, 5)]), [3]);
        assert_eq!(share(8, &[want(0, 2), want(0, 1)]), [2, 1], "rows no one wants stay free");
        assert_eq!(share(0, &[want(0, 2)]), [0]);
        assert!(share(4, &[]).is_empty());
    }

    #[test]
    fn a_short_request_behind_a_big_one_gets_the_next_free_row() {
        // The big request already holds a row and waits for 7 more; the newcomer holds none.
        assert_eq!(share(1, &[want(1, 7), want(0, 1)]), [0, 1]);
        // Both hold nothing: the older first.
        assert_eq!(share(1, &[want(0, 8), want(0, 1)]), [1, 0]);
    }

    #[test]
    fn equal_holdings_take_turns_and_unequal_ones_are_levelled() {
        assert_eq!(share(4, &[want(0, 8), want(0, 8)]), [2, 2]);
        assert_eq!(share(3, &[want(0, 8), want(0, 8), want(0, 8)]), [1, 1, 1]);
        assert_eq!(share(5, &[want(0, 8), want(0, 8)]), [3, 2], "the older gets the odd row");
        // 2 held against 0: the second catches up, then they alternate from the older.
        assert_eq!(share(3, &[want(2, 5), want(0, 5)]), [1, 2]);
        // Uneven wants: the small one is filled, the rest levels the others' holdings (4 and 1 + 2).
        assert_eq!(share(7, &[want(0, 9), want(0, 1), want(1, 9)]), [4, 1, 2]);
    }
}
