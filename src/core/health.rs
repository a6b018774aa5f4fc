//! When a backend counts as down or up again: a run of failed or passed probes, so one lost
//! packet does not move clients and a flapping backend does not either. Pure: the prober
//! feeds it results.

/// How many probe results in a row change a backend's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Thresholds {
    /// Failures in a row that make an up backend down.
    pub fall: u32,
    /// Successes in a row that make a down backend up.
    pub rise: u32,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds { fall: 2, rise: 2 }
    }
}

/// A backend's state as its probes tell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Health {
    pub up: bool,
    /// Results in a row that disagree with `up`.
    streak: u32,
}

impl Health {
    pub fn new(up: bool) -> Health {
        Health { up, streak: 0 }
    }

    /// Takes one probe's result; returns the new state when it changed.
    pub fn observe(&mut self, passed: bool, thresholds: Thresholds) -> Option<bool> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up {
            thresholds.fall
        } else {
            thresholds.rise
        };
        if self.streak < needed.max(1) {
            return None;
        }
        self.up = passed;
        self.streak = 0;
        Some(passed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_of_failures_makes_it_down_and_a_run_of_passes_up() {
        let t = Thresholds { fall: 2, rise: 3 };
        let mut h = Health::new(true);
        assert_eq!(h.observe(false, t), None);
        assert_eq!(h.observe(true, t), None, "one failure is forgotten");
        assert_eq!(h.observe(false, t), None);
        assert_eq!(h.observe(false, t), Some(false));
        assert_eq!(h.observe(false, t), None);
        assert_eq!(h.observe(true, t), None);
        assert_eq!(h.observe(true, t), None);
        assert_eq!(h.observe(true, t), Some(true));
        assert!(h.up);
    }

    #[test]
    fn thresholds_of_zero_act_as_one() {
        let t = Thresholds { fall: 0, rise: 0 };
        let mut h = Health::new(true);
        assert_eq!(h.observe(false, t), Some(false));
        assert_eq!(h.observe(true, t), Some(true));
    }
}
