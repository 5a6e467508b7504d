//! Rise/fall hysteresis as a pure observer of probe results: it decides when a broker's probe
//! state flips, and the checker loop does the IO, the logging and the events.
//!
//! The first answer sets the state directly (there is nothing to be hysteretic about yet).
//! After that `rise` successes in a row bring a down broker up and `fall` failures in a row
//! take an up broker down; one result of the other kind starts the count again.

/// Consecutive probe results of one broker and the state they have led to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observer {
    pub rise: u32,
    pub fall: u32,
    /// `None` until the first answer.
    pub up: Option<bool>,
    /// Successes in a row.
    pub ok: u32,
    /// Failures in a row.
    pub fail: u32,
}

impl Observer {
    /// Starts from `up`, the broker's current probe state, so a checker started by a config
    /// reload carries on from what the previous one established instead of starting over.
    pub fn new(rise: u32, fall: u32, up: Option<bool>) -> Observer {
        Observer { rise, fall, up, ok: 0, fail: 0 }
    }

    /// Counts one probe result; the new state when it flips (or is first set), else `None`.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if ok {
            self.ok += 1;
            self.fail = 0;
        } else {
            self.fail += 1;
            self.ok = 0;
        }
        let flip = match self.up {
            None => Some(ok),
            Some(true) if self.fail >= self.fall => Some(false),
            Some(false) if self.ok >= self.rise => Some(true),
            _ => None,
        };
        if flip.is_some() {
            self.up = flip;
        }
        flip
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `results` in order and returns what each call answered.
    fn run(o: &mut Observer, results: &[bool]) -> Vec<Option<bool>> {
        results.iter().map(|&ok| o.observe(ok)).collect()
    }

    #[test]
    fn first_success_sets_up_at_once() {
        let mut o = Observer::new(3, 3, None);
        assert_eq!(o.observe(true), Some(true));
        assert_eq!(o.up, Some(true));
        assert_eq!((o.ok, o.fail), (1, 0));
    }

    #[test]
    fn first_failure_sets_down_at_once() {
        let mut o = Observer::new(3, 3, None);
        assert_eq!(o.observe(false), Some(false));
        assert_eq!(o.up, Some(false));
        assert_eq!((o.ok, o.fail), (0, 1));
    }

    #[test]
    fn falls_after_exactly_fall_failures_in_a_row() {
        let mut o = Observer::new(2, 3, Some(true));
        assert_eq!(run(&mut o, &[false, false]), vec![None, None]);
        assert_eq!(o.up, Some(true), "two of three failures keep it up");
        assert_eq!(o.observe(false), Some(false));
        assert_eq!((o.up, o.fail), (Some(false), 3));
    }

    #[test]
    fn rises_after_exactly_rise_successes_in_a_row() {
        let mut o = Observer::new(4, 2, Some(false));
        assert_eq!(run(&mut o, &[true, true, true]), vec![None, None, None]);
        assert_eq!(o.up, Some(false));
        assert_eq!(o.observe(true), Some(true));
        assert_eq!((o.up, o.ok), (Some(true), 4));
    }

    #[test]
    fn a_success_breaks_a_falling_streak() {
        let mut o = Observer::new(2, 3, Some(true));
        let answers = run(&mut o, &[false, false, true, false, false]);
        assert_eq!(answers, vec![None; 5], "never three failures in a row");
        assert_eq!((o.up, o.ok, o.fail), (Some(true), 0, 2));
        assert_eq!(o.observe(false), Some(false), "the third in a row");
    }

    #[test]
    fn a_failure_breaks_a_rising_streak() {
        let mut o = Observer::new(3, 2, Some(false));
        let answers = run(&mut o, &[true, true, false, true, true]);
        assert_eq!(answers, vec![None; 5], "never three successes in a row");
        assert_eq!((o.up, o.ok, o.fail), (Some(false), 2, 0));
        assert_eq!(o.observe(true), Some(true), "the third in a row");
    }

    #[test]
    fn steady_results_never_flip_again() {
        let mut up = Observer::new(2, 2, None);
        assert_eq!(up.observe(true), Some(true));
        assert_eq!(run(&mut up, &[true; 50]), vec![None; 50]);
        assert_eq!((up.up, up.ok), (Some(true), 51));

        let mut down = Observer::new(2, 2, None);
        assert_eq!(down.observe(false), Some(false));
        assert_eq!(run(&mut down, &[false; 50]), vec![None; 50]);
        assert_eq!((down.up, down.fail), (Some(false), 51));
    }

    #[test]
    fn flips_both_ways_with_thresholds_of_one() {
        let mut o = Observer::new(1, 1, Some(true));
        assert_eq!(
            run(&mut o, &[false, false, true, true, false]),
            vec![Some(false), None, Some(true), None, Some(false)]
        );
    }

    #[test]
    fn counts_carry_on_after_a_flip() {
        // The checker logs how many results in a row made the flip; the count is not reset by it.
        let mut o = Observer::new(2, 2, Some(true));
        assert_eq!(run(&mut o, &[false, false, false]), vec![None, Some(false), None]);
        assert_eq!(o.fail, 3);
        assert_eq!(run(&mut o, &[true, true]), vec![None, Some(true)]);
        assert_eq!((o.ok, o.fail), (2, 0));
    }

    #[test]
    fn a_state_carried_over_a_reload_needs_the_full_threshold() {
        // A new checker (after a reload) starts from the broker's state, not from scratch:
        // a single failure must not take a known-up broker down as a first answer would.
        let mut o = Observer::new(2, 3, Some(true));
        assert_eq!(o.observe(false), None);
        assert_eq!(o.up, Some(true));
        let mut o = Observer::new(3, 2, Some(false));
        assert_eq!(o.observe(true), None);
        assert_eq!(o.up, Some(false));
    }
}
