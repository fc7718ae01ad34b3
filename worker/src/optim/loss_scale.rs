//! DeepSpeed's dynamic loss scaler (`DynamicLossScaler.update_scale`, fp16 block of
//! ds_config.json): on overflow spend hysteresis, then halve (not below the minimum, or abort
//! there); after every `window` clean steps since the last overflow, double.

use zerotune_proto::plan::LossScaler as Settings;
use zerotune_proto::state::LossScalerState;

#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub scale: f64,
    settings: Settings,
    hysteresis_left: u32,
    iteration: i64,
    last_overflow_iteration: i64,
    /// Steps skipped for overflow so far.
    pub skipped: u64,
}

/// Overflow at the minimum scale with `abort_at_min_scale` set.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("fp16 gradients overflowed with the loss scale already at its minimum ({0}); the run cannot continue (use --bf16, lower the learning rate, or set fp16.min_loss_scale lower)")]
pub struct AtMinimum(pub f64);

impl LossScaler {
    pub fn new(settings: Settings) -> Self {
        Self {
            scale: 2f64.powi(settings.initial_scale_power as i32),
            settings,
            hysteresis_left: settings.hysteresis,
            iteration: 0,
            last_overflow_iteration: -1,
            skipped: 0,
        }
    }

    /// The scaler as a checkpoint holds it (`optimizer/layout.json`).
    pub fn state(&self) -> LossScalerState {
        let Self { scale, settings, hysteresis_left, iteration, last_overflow_iteration, skipped } = *self;
        LossScalerState { scale, settings, hysteresis_left, iteration, last_overflow_iteration, skipped }
    }

    /// The scaler a checkpoint held.
    pub fn from_state(state: LossScalerState) -> Self {
        let LossScalerState { scale, settings, hysteresis_left, iteration, last_overflow_iteration, skipped } = state;
        Self { scale, settings, hysteresis_left, iteration, last_overflow_iteration, skipped }
    }

    /// Records one step's outcome and adjusts the scale for the next one.
    pub fn update(&mut self, overflow: bool) -> Result<(), AtMinimum> {
        if overflow {
            self.skipped += 1;
            if self.settings.hysteresis <= 1 || self.hysteresis_left <= 1 {
                if self.scale <= self.settings.min_scale && self.settings.abort_at_min_scale {
                    return Err(AtMinimum(self.scale));
                }
                self.scale = (self.scale / 2.0).max(self.settings.min_scale);
            } else {
                self.hysteresis_left -= 1;
            }
            self.last_overflow_iteration = self.iteration;
        } else if (self.iteration - self.last_overflow_iteration) % self.settings.window as i64 == 0 {
            self.hysteresis_left = self.settings.hysteresis;
            self.scale *= 2.0;
        }
        self.iteration += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scaler(power: u32, window: u32, hysteresis: u32, min_scale: f64) -> LossScaler {
        LossScaler::new(Settings { initial_scale_power: power, window, hysteresis, min_scale, abort_at_min_scale: true })
    }

    fn run(s: &mut LossScaler, overflows: &[bool]) -> Vec<f64> {
        overflows
            .iter()
            .map(|&o| {
                s.update(o).unwrap();
                s.scale
            })
            .collect()
    }

    #[test]
    fn no_overflow_doubles_every_window() {
        let mut s = scaler(4, 3, 2, 1.0);
        assert_eq!(run(&mut s, &[false; 7]), [16., 16., 32., 32., 32., 64., 64.]);
    }

    #[test]
    fn all_overflow_spends_hysteresis_then_halves_to_the_minimum_and_aborts() {
        let mut s = scaler(3, 1000, 2, 2.0);
        assert_eq!(run(&mut s, &[true; 3]), [8., 4., 2.]);
        assert_eq!(s.update(true), Err(AtMinimum(2.0)));
        assert_eq!(s.skipped, 4);
    }

    #[test]
    fn some_overflow_restarts_the_window_and_hysteresis_refills_on_growth() {
        let mut s = scaler(4, 2, 2, 1.0);
        let seq = [false, true, false, false, true, true, false, false];
        // i0 clean: (0+1)%2 != 0 -> 16; i1 overflow: hysteresis 2 -> 1, 16; i2: (2-1)%2 -> 16;
        // i3: (3-1)%2 == 0 -> 32, hysteresis refilled; i4 overflow -> 1 left, 32; i5 overflow -> 16;
        // i6: (6-5)%2 -> 16; i7: (7-5)%2 == 0 -> 32.
        assert_eq!(run(&mut s, &seq), [16., 16., 16., 32., 32., 16., 16., 32.]);
        assert_eq!(s.skipped, 3);
    }

    /// A checkpoint's scaler continues as the saved one would have.
    #[test]
    fn the_saved_state_restores_the_scaler() {
        let mut s = scaler(4, 2, 2, 1.0);
        run(&mut s, &[false, true, true]);
        let mut restored = LossScaler::from_state(s.state());
        assert_eq!(restored, s);
        assert_eq!(run(&mut restored, &[false, false, true]), run(&mut s, &[false, false, true]));
    }
}
