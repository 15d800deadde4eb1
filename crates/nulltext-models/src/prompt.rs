//! Prompts as the UNet takes them: the text context of every family and, for SDXL, the
//! pooled text embedding. Batches of them are narrowed, concatenated, moved and optimized
//! as one value, so that no caller handles the two parts apart.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

/// The embeddings of a batch of prompts (or of the unconditional input), row by row.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[B, 77, D]`: the text encoder's hidden states (SDXL: both encoders', concatenated).
    pub context: Tensor,
    /// `[B, P]`: SDXL's pooled embedding (the second encoder's projected output); `None` for
    /// SD 1.x/2.x.
    pub pooled: Option<Tensor>,
}

impl PromptEmbeds {
    /// Embeddings with a context only (SD 1.x/2.x).
    pub fn context(context: Tensor) -> Self {
        Self {
            context,
            pooled: None,
        }
    }

    /// The number of rows B.
    pub fn rows(&self) -> Result<usize> {
        Ok(self.context.dim(0)?)
    }

    /// `f` applied to each part.
    pub fn map(&self, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> Result<Self> {
        Ok(Self {
            context: f(&self.context)?,
            pooled: self.pooled.as_ref().map(f).transpose()?,
        })
    }

    /// Rows `start .. start + len`.
    pub fn narrow(&self, start: usize, len: usize) -> Result<Self> {
        self.map(|t| t.narrow(0, start, len))
    }

    /// The rows of `parts`, one after the other; all must have a pooled part or none.
    pub fn cat(parts: &[&Self]) -> Result<Self> {
        let contexts: Vec<&Tensor> = parts.iter().map(|p| &p.context).collect();
        let pooled: Vec<&Tensor> = parts.iter().filter_map(|p| p.pooled.as_ref()).collect();
        let pooled = match pooled.len() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(&pooled, 0)?),
            _ => {
                return Err(Error::Msg(
                    "prompt embeddings with and without a pooled part cannot be batched".into(),
                ))
            }
        };
        Ok(Self {
            context: Tensor::cat(&contexts, 0)?,
            pooled,
        })
    }

    /// One row repeated to `rows` rows (or these embeddings, when they have `rows` already).
    pub fn expand_rows(&self, rows: usize) -> Result<Self> {
        if self.rows()? == rows {
            return Ok(self.clone());
        }
        self.map(|t| {
            let mut dims = t.dims().to_vec();
            dims[0] = rows;
            t.broadcast_as(dims)?.contiguous()
        })
    }

    /// Zeros of the same shapes.
    pub fn zeros_like(&self) -> Result<Self> {
        self.map(|t| t.zeros_like())
    }

    /// Without autograd history.
    pub fn detach(&self) -> Self {
        Self {
            context: self.context.detach(),
            pooled: self.pooled.as_ref().map(|t| t.detach()),
        }
    }

    /// On `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        self.map(|t| t.to_device(device))
    }

    /// In `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.map(|t| t.to_dtype(dtype))
    }

    /// The parts, context first.
    pub fn parts(&self) -> impl Iterator<Item = &Tensor> {
        std::iter::once(&self.context).chain(self.pooled.as_ref())
    }
}
