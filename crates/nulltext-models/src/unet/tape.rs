//! Running the UNet: single passes, and the context tape — the UNet at one latent and
//! timestep, differentiated with respect to its text context only (the inner loop of
//! null-text inversion), and for SDXL also with respect to its pooled text embedding.

use candle_core::{DType, Tensor, Var};

use super::model::{AddedCond, Execution, UNet2DConditionModel};
use super::pass::{Backward, Constants, Pass, Record};
use crate::config::TIME_IDS;
use crate::control::{AttentionControl, NoControl};
use crate::error::{Error, Result};
use crate::prompt::PromptEmbeds;

impl UNet2DConditionModel {
    /// ε (or v) prediction for latents `x` `[B, C, h, w]` at `timestep`, with text
    /// `context` `[B, 77, D]` (SD 1.x/2.x; SDXL takes [`Self::forward_conditioned`]).
    pub fn forward(&self, x: &Tensor, timestep: f64, context: &Tensor) -> Result<Tensor> {
        self.forward_controlled(x, timestep, context, &mut NoControl, 0)
    }

    /// As [`Self::forward`], calling `control` at every attention layer with `step`.
    pub fn forward_controlled(
        &self,
        x: &Tensor,
        timestep: f64,
        context: &Tensor,
        control: &mut dyn AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        self.forward_conditioned(x, timestep, context, None, control, step)
    }

    /// As [`Self::forward_controlled`], with SDXL's `added` conditioning (required by a
    /// UNet that [takes it](Self::takes_added_cond), refused by the others).
    pub fn forward_conditioned(
        &self,
        x: &Tensor,
        timestep: f64,
        context: &Tensor,
        added: Option<&AddedCond>,
        control: &mut dyn AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        let b = x.dim(0)?;
        self.run(x, &vec![timestep; b], context, added, control, step)
    }

    /// As [`Self::forward`], with one timestep per latent (training).
    pub fn forward_timesteps(
        &self,
        x: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
    ) -> Result<Tensor> {
        self.run(x, timesteps, context, None, &mut NoControl, 0)
    }

    /// As [`Self::forward_timesteps`], calling `control` at every attention layer (training
    /// terms on the attention maps).
    pub fn forward_timesteps_controlled(
        &self,
        x: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        control: &mut dyn AttentionControl,
    ) -> Result<Tensor> {
        self.run(x, timesteps, context, None, control, 0)
    }

    /// Checks latents `[B, C, h, w]` against this UNet and `rows` contexts or timesteps.
    fn check_latents(&self, x: &Tensor, rows: usize, what: &str) -> Result<()> {
        let (b, c, _, _) = x.dims4()?;
        if c != self.config.in_channels {
            return Err(Error::Msg(format!(
                "UNet expects {} latent channels, got {c}",
                self.config.in_channels
            )));
        }
        if rows != b {
            return Err(Error::Msg(format!(
                "UNet: batch of {b} latents but {rows} {what}"
            )));
        }
        Ok(())
    }

    /// Checks SDXL's added conditioning against this UNet and `b` latents.
    fn check_added(&self, added: Option<&AddedCond>, b: usize) -> Result<()> {
        let (Some(e), Some(a)) = (&self.add_embedding, added) else {
            return Ok(());
        };
        let dims = e.dims();
        let text = a.text_embeds.dims();
        let ids = a.time_ids.dims();
        if text != [b, dims.text] || ids != [b, TIME_IDS] {
            return Err(Error::Msg(format!(
                "UNet: for {b} latents, the pooled text embedding must be [{b}, {}] and the \
                 time ids [{b}, {TIME_IDS}]; got {text:?} and {ids:?}",
                dims.text
            )));
        }
        Ok(())
    }

    fn run(
        &self,
        x: &Tensor,
        timesteps: &[f64],
        context: &Tensor,
        added: Option<&AddedCond>,
        control: &mut dyn AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        self.check_latents(x, timesteps.len(), "timesteps")?;
        self.check_latents(x, context.dim(0)?, "contexts")?;
        self.check_added(added, timesteps.len())?;
        let dtype = self.conv_in.weight.dtype();
        let x = x.to_dtype(dtype)?;
        let context = context.to_dtype(dtype)?;
        let biases = self.time_biases(timesteps, added, &x)?;
        Pass::new(&biases, &context, control, step).unet(self, &x)
    }

    /// A [`ContextTape`] for latents `x` `[B, C, h, w]` at `timestep`; `None` where this
    /// UNet was loaded for candle's graph ([`Execution::Graph`]): then the caller
    /// differentiates through the graph.
    pub fn context_tape(&self, x: &Tensor, timestep: f64) -> Result<Option<ContextTape<'_>>> {
        self.context_tape_conditioned(x, timestep, None)
    }

    /// As [`Self::context_tape`], with SDXL's `added` conditioning: its time ids stay fixed
    /// for the tape's passes, and so does its pooled text embedding except in the passes
    /// that take their own ([`ContextTape::forward_pooled`]). The time embedding of the
    /// fixed conditioning is computed once.
    pub fn context_tape_conditioned(
        &self,
        x: &Tensor,
        timestep: f64,
        added: Option<&AddedCond>,
    ) -> Result<Option<ContextTape<'_>>> {
        if self.execution == Execution::Graph {
            return Ok(None);
        }
        let b = x.dim(0)?;
        self.check_latents(x, b, "timesteps")?;
        self.check_added(added, b)?;
        let latent = x.to_dtype(self.conv_in.weight.dtype())?.detach();
        Ok(Some(ContextTape {
            unet: self,
            biases: self.time_biases(&vec![timestep; b], added, &latent)?,
            latent,
            timestep,
            time_ids: added.map(|a| a.time_ids.clone()),
            consts: Constants::default(),
            records: None,
            pooled: None,
            context_dtype: DType::F32,
        }))
    }
}

/// The UNet at one latent and timestep, differentiated with respect to its text context
/// only: the inner loop of null-text inversion, without candle's autograd graph. For SDXL
/// the `*_pooled` passes also vary the pooled text embedding, the other half of SDXL's
/// unconditional input.
///
/// Its passes run the UNet's one traversal (`super::pass`), so their values are those of
/// [`UNet2DConditionModel::forward`]; what does not depend on the varying inputs is
/// computed by the first pass and reused. On the CPU in f32 the layers run nulltext's own
/// kernels, elsewhere candle's ops with the layers' input-gradient formulas.
pub struct ContextTape<'a> {
    unet: &'a UNet2DConditionModel,
    latent: Tensor,
    timestep: f64,
    /// SDXL's time ids (`None` for SD 1.x/2.x).
    time_ids: Option<Tensor>,
    /// The residual blocks' biases for the fixed conditioning.
    biases: Vec<Option<Tensor>>,
    consts: Constants,
    /// What the last recorded pass kept for [`Self::backward`].
    records: Option<Vec<Record>>,
    /// What the last recorded pass with its own pooled embedding kept for
    /// [`Self::backward_pooled`].
    pooled: Option<PooledRecord>,
    /// The context's dtype, for its gradient.
    context_dtype: DType,
}

/// A recorded pass's pooled text embedding, as a variable, and the residual blocks' biases
/// computed from it through candle's graph (the time embedding's layers are small: their
/// gradient is candle's autograd of `time_biases`).
struct PooledRecord {
    text_embeds: Var,
    biases: Vec<Option<Tensor>>,
}

impl ContextTape<'_> {
    /// The UNet's output `[B, C_out, h, w]` for `context` `[B, L, D]`, keeping what the
    /// backward pass needs.
    pub fn forward(&mut self, context: &Tensor) -> Result<Tensor> {
        self.pass(context, None, &mut NoControl, 0, true)
    }

    /// As [`Self::forward`], calling `control` at every attention layer with `step`; the
    /// gradient then runs through the controller's edits (candle's autograd at the sites
    /// it edits). Nothing is reused between passes while a controller watches.
    pub fn forward_controlled(
        &mut self,
        context: &Tensor,
        control: &mut dyn AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        self.pass(context, None, control, step, true)
    }

    /// The UNet's output for `context` without keeping anything for a backward pass (what
    /// does not depend on the context is shared with [`Self::forward`]).
    pub fn predict(&mut self, context: &Tensor) -> Result<Tensor> {
        self.pass(context, None, &mut NoControl, 0, false)
    }

    /// The output of an SDXL UNet for `context` `[B, L, D]` and the pooled text embedding
    /// `text_embeds` `[B, P]` (in place of the tape's), keeping what
    /// [`Self::backward_pooled`] needs. Only the input convolution is reused: the pooled
    /// embedding reaches every residual block. An error for a tape without SDXL's added
    /// conditioning.
    pub fn forward_pooled(&mut self, context: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        self.pass(context, Some(text_embeds), &mut NoControl, 0, true)
    }

    /// As [`Self::forward_pooled`], without keeping anything for a backward pass.
    pub fn predict_pooled(&mut self, context: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        self.pass(context, Some(text_embeds), &mut NoControl, 0, false)
    }

    fn pass(
        &mut self,
        context: &Tensor,
        text_embeds: Option<&Tensor>,
        control: &mut dyn AttentionControl,
        step: usize,
        record: bool,
    ) -> Result<Tensor> {
        let unet = self.unet;
        unet.check_latents(&self.latent, context.dim(0)?, "contexts")?;
        self.records = None;
        self.pooled = None;
        self.context_dtype = context.dtype();
        let ctx = context.detach().to_dtype(unet.conv_in.weight.dtype())?;
        let own = match text_embeds {
            Some(t) => Some(self.pooled_biases(t, record)?),
            None => None,
        };
        let biases = own.as_ref().map_or(&self.biases, |(b, _)| b);
        self.consts.rewind();
        let mut pass = Pass::new(biases, &ctx, control, step)
            .recording(record)
            .varying_biases(own.is_some());
        if !pass.watched() {
            pass = pass.reusing(&mut self.consts);
        }
        let out = pass.unet(unet, &self.latent)?;
        self.records = record.then_some(pass.records);
        self.pooled = own.and_then(|(_, p)| p);
        Ok(out)
    }

    /// The residual blocks' biases for the pooled embedding `text_embeds` and the tape's
    /// time ids, without a graph; for a recorded pass also their graph from `text_embeds`.
    fn pooled_biases(
        &self,
        text_embeds: &Tensor,
        record: bool,
    ) -> Result<(Vec<Option<Tensor>>, Option<PooledRecord>)> {
        let time_ids = self.time_ids.clone().ok_or_else(|| {
            Error::Msg(
                "context tape: only an SDXL UNet's tape (made with added conditioning) takes \
                 a pooled text embedding"
                    .into(),
            )
        })?;
        let var = match record {
            true => Some(Var::from_tensor(&text_embeds.detach())?),
            false => None,
        };
        let added = AddedCond {
            text_embeds: var
                .as_ref()
                .map_or_else(|| text_embeds.detach(), |v| v.as_tensor().clone()),
            time_ids,
        };
        let b = self.latent.dim(0)?;
        self.unet.check_added(Some(&added), b)?;
        let biases = self
            .unet
            .time_biases(&vec![self.timestep; b], Some(&added), &self.latent)?;
        let Some(text_embeds) = var else {
            return Ok((biases, None));
        };
        // the traversal takes the values; the graph stays for the backward pass
        let values = biases
            .iter()
            .map(|b| b.as_ref().map(Tensor::detach))
            .collect();
        Ok((
            values,
            Some(PooledRecord {
                text_embeds,
                biases,
            }),
        ))
    }

    /// The gradient of the context given the gradient `grad` of the last forward pass's
    /// output (after [`Self::forward_pooled`], the context's part of
    /// [`Self::backward_pooled`]). Consumes that pass's records.
    pub fn backward(&mut self, grad: &Tensor) -> Result<Tensor> {
        self.pooled = None;
        Ok(self.backward_biases(grad)?.0)
    }

    /// The gradients of the context and of the pooled text embedding given the gradient
    /// `grad` of the output of the last pass, which must be [`Self::forward_pooled`]'s.
    /// Consumes that pass's records.
    pub fn backward_pooled(&mut self, grad: &Tensor) -> Result<(Tensor, Tensor)> {
        let pooled = self.pooled.take().ok_or_else(|| {
            Error::Msg("context tape: backward_pooled needs a forward_pooled pass before it".into())
        })?;
        let (dctx, dbias) = self.backward_biases(grad)?;
        // d/d text_embeds of Σ_r ⟨bias_r, dbias_r⟩ through the biases' graph
        let mut dot: Option<Tensor> = None;
        for (b, d) in pooled.biases.iter().zip(&dbias) {
            let (Some(b), Some(d)) = (b, d) else {
                continue;
            };
            // [B, C, 1, 1] -> [B, C]
            let term = (b.flatten_from(1)?.to_dtype(d.dtype())? * d)?.sum_all()?;
            dot = Some(match dot {
                Some(acc) => (acc + term)?,
                None => term,
            });
        }
        let v = pooled.text_embeds.as_tensor();
        let dpooled = match dot {
            Some(dot) => dot.backward()?.remove(v),
            None => None,
        };
        Ok((dctx, dpooled.map_or_else(|| v.zeros_like(), Ok)?))
    }

    /// The context's gradient (in its dtype) and the residual blocks' bias gradients
    /// ([`Backward::unet`]) for the last recorded pass.
    fn backward_biases(&mut self, grad: &Tensor) -> Result<(Tensor, Vec<Option<Tensor>>)> {
        let records = self.records.take().ok_or_else(|| {
            Error::Msg("context tape: backward needs a forward pass before it".into())
        })?;
        let grad = grad.to_dtype(self.unet.conv_out.weight.dtype())?;
        let (dctx, dbias) = Backward::unet(self.unet, records, &grad)?;
        Ok((dctx.to_dtype(self.context_dtype)?, dbias))
    }

    /// Whether the layers run nulltext's CPU kernels (f32 on the CPU) rather than candle's
    /// tensor ops.
    pub fn is_host(&self) -> bool {
        self.latent.device().is_cpu() && self.latent.dtype() == DType::F32
    }
}

/// Passes that take whole prompt embeddings: with a pooled part (SDXL), the pooled
/// embedding is an input of the pass and differentiated like the context.
impl ContextTape<'_> {
    /// [`Self::predict`] (or, with a pooled part, [`Self::predict_pooled`]) of `embeds`.
    pub fn predict_embeds(&mut self, embeds: &PromptEmbeds) -> Result<Tensor> {
        match &embeds.pooled {
            None => self.predict(&embeds.context),
            Some(pooled) => self.predict_pooled(&embeds.context, pooled),
        }
    }

    /// [`Self::forward`] (or, with a pooled part, [`Self::forward_pooled`]) of `embeds`,
    /// keeping what [`Self::backward_embeds`] needs.
    pub fn forward_embeds(&mut self, embeds: &PromptEmbeds) -> Result<Tensor> {
        match &embeds.pooled {
            None => self.forward(&embeds.context),
            Some(pooled) => self.forward_pooled(&embeds.context, pooled),
        }
    }

    /// The gradient of every part of the embeddings of the last
    /// [`Self::forward_embeds`] pass, given the gradient `grad` of its output.
    pub fn backward_embeds(&mut self, grad: &Tensor) -> Result<PromptEmbeds> {
        if self.pooled.is_none() {
            return Ok(PromptEmbeds::context(self.backward(grad)?));
        }
        let (context, pooled) = self.backward_pooled(grad)?;
        Ok(PromptEmbeds {
            context,
            pooled: Some(pooled),
        })
    }
}
