//! The deterministic DDIM scheduler (η = 0), forwards for sampling and backwards for
//! inversion, exactly as the null-text reference computes it (spec §1–2).

use candle_core::Tensor;

use crate::config::SchedulerConfig;
use crate::error::{Error, Result};

/// `torch.linspace(start, end, n, dtype=float32)`: the same float32 arithmetic, so the
/// betas agree bit for bit.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}

/// ᾱ_t = Π (1 − β), from the config's beta schedule (float32 values, cumulated in double
/// precision as PyTorch's CPU `cumprod` does).
pub fn alphas_cumprod(c: &SchedulerConfig) -> Result<Vec<f32>> {
    let n = c.num_train_timesteps;
    let betas: Vec<f32> = match c.beta_schedule.as_str() {
        "linear" => linspace_f32(c.beta_start as f32, c.beta_end as f32, n),
        "scaled_linear" => {
            linspace_f32((c.beta_start as f32).sqrt(), (c.beta_end as f32).sqrt(), n)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
        "squaredcos_cap_v2" => {
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                })
                .collect()
        }
        s => return Err(Error::Unsupported(format!("beta_schedule `{s}`"))),
    };
    let mut acc = 1f64;
    Ok(betas
        .iter()
        .map(|b| {
            acc *= (1f32 - b) as f64;
            acc as f32
        })
        .collect())
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
}

/// DDIM with a fixed number of inference steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    timesteps: Vec<usize>,
    step_ratio: usize,
    prediction: Prediction,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        config.validate()?;
        let n = config.num_train_timesteps;
        let max = Self::max_steps(config);
        if num_inference_steps == 0 || num_inference_steps > max {
            return Err(Error::Msg(format!(
                "the number of steps must be between 1 and {max} for this scheduler, got \
                 {num_inference_steps}"
            )));
        }
        let alphas_cumprod = alphas_cumprod(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let t = num_inference_steps;
        let timesteps: Vec<usize> = match config.timestep_spacing.as_str() {
            "leading" => {
                let ratio = n / t;
                (0..t)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            "trailing" => {
                let ratio = n as f64 / t as f64;
                (0..t)
                    .map(|i| ((n as f64 - i as f64 * ratio).round() as usize).saturating_sub(1))
                    .collect()
            }
            "linspace" => {
                let step = (n - 1) as f64 / (t.max(2) - 1) as f64;
                (0..t)
                    .rev()
                    .map(|i| (i as f64 * step).round() as usize)
                    .collect()
            }
            s => return Err(Error::Unsupported(format!("timestep_spacing `{s}`"))),
        };
        if let Some(bad) = timesteps.iter().find(|ts| **ts >= n) {
            return Err(Error::Msg(format!(
                "timestep {bad} out of range for {n} training steps"
            )));
        }
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            p => return Err(Error::Unsupported(format!("prediction_type `{p}`"))),
        };
        Ok(Self {
            config: config.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            step_ratio: n / t,
            prediction,
        })
    }

    /// The most steps `config` can take with every timestep below `num_train_timesteps`:
    /// "leading" spacing puts the last at (T−1)·⌊n/T⌋ + `steps_offset` (SD's 1000 training
    /// steps with offset 1 allow 999); the other spacings end at n − 1 for any T ≤ n.
    pub fn max_steps(config: &SchedulerConfig) -> usize {
        let n = config.num_train_timesteps;
        if config.timestep_spacing != "leading" {
            return n;
        }
        (1..=n)
            .rev()
            .find(|&t| (t - 1) * (n / t) + config.steps_offset < n)
            .unwrap_or(0)
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    /// Sampling timesteps, largest first (`[981, 961, …, 1]` for SD with 50 steps).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn num_steps(&self) -> usize {
        self.timesteps.len()
    }

    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    pub fn prediction(&self) -> Prediction {
        self.prediction
    }

    /// ᾱ at `t`, or the final ᾱ for `t < 0`.
    pub fn alpha_at(&self, t: i64) -> f32 {
        if t < 0 {
            self.final_alpha_cumprod
        } else {
            self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
        }
    }

    /// The timestep a DDIM step from `t` lands on (may be negative).
    pub fn prev_timestep(&self, t: usize) -> i64 {
        t as i64 - self.step_ratio as i64
    }

    /// Converts a model output at `t` for `sample` into a noise prediction ε.
    pub fn epsilon(&self, model_output: &Tensor, t: usize, sample: &Tensor) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(model_output.clone()),
            Prediction::VPrediction => {
                // ε = √ᾱ v + √(1−ᾱ) x
                let a = self.alpha_at(t as i64);
                Ok(((model_output * a.sqrt() as f64)? + (sample * (1f32 - a).sqrt() as f64)?)?)
            }
        }
    }

    /// One DDIM move of `z` from ᾱ_from to ᾱ_to with noise prediction `eps`:
    /// x̂₀ = (z − √(1−ᾱ_from) ε)/√ᾱ_from, then √ᾱ_to x̂₀ + √(1−ᾱ_to) ε.
    pub fn transfer(&self, eps: &Tensor, z: &Tensor, a_from: f32, a_to: f32) -> Result<Tensor> {
        let x0 = ((z - (eps * (1f32 - a_from).sqrt() as f64)?)? / a_from.sqrt() as f64)?;
        Ok(((x0 * a_to.sqrt() as f64)? + (eps * (1f32 - a_to).sqrt() as f64)?)?)
    }

    /// Denoising step at sampling timestep `t` (to `t − ratio`), given ε.
    pub fn step(&self, eps: &Tensor, t: usize, z: &Tensor) -> Result<Tensor> {
        let a_t = self.alpha_at(t as i64);
        let a_prev = self.alpha_at(self.prev_timestep(t));
        self.transfer(eps, z, a_t, a_prev)
    }

    /// Inversion step to timestep `t` from `min(t − ratio, 999)`, given ε evaluated at `t`.
    pub fn inverse_step(&self, eps: &Tensor, t: usize, z: &Tensor) -> Result<Tensor> {
        let last = self.config.num_train_timesteps as i64 - 1;
        let cur = self.prev_timestep(t).min(last);
        self.transfer(eps, z, self.alpha_at(cur), self.alpha_at(t as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_timesteps() {
        let d = Ddim::new(&SchedulerConfig::default(), 50).unwrap();
        assert_eq!(d.timesteps()[0], 981);
        assert_eq!(*d.timesteps().last().unwrap(), 1);
        assert_eq!(d.prev_timestep(1), -19);
        assert_eq!(d.alpha_at(-19), d.alphas_cumprod()[0]);
        assert_eq!(Ddim::max_steps(&SchedulerConfig::default()), 999);
        assert!(Ddim::new(&SchedulerConfig::default(), 999).is_ok());
        let e = Ddim::new(&SchedulerConfig::default(), 1000).unwrap_err();
        assert!(e.to_string().contains("between 1 and 999"), "{e}");
    }

    #[test]
    fn trailing_and_linspace() {
        let mut c = SchedulerConfig {
            timestep_spacing: "trailing".into(),
            ..Default::default()
        };
        let d = Ddim::new(&c, 50).unwrap();
        assert_eq!(d.timesteps()[0], 999);
        assert_eq!(*d.timesteps().last().unwrap(), 19);
        c.timestep_spacing = "linspace".into();
        let d = Ddim::new(&c, 50).unwrap();
        assert_eq!(d.timesteps()[0], 999);
        assert_eq!(*d.timesteps().last().unwrap(), 0);
    }
}
