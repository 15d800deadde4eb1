//! Attention in the UNet (diffusers `Attention`, `BasicTransformerBlock`,
//! `Transformer2DModel`): the layers, and the attention core with its backward pass, where
//! the attention controller sees the probabilities. The UNet's traversal
//! (`crate::unet`) calls them in order.

use candle_core::{DType, Tensor, Var, D};

use crate::control::{AttentionCall, AttentionControl, AttentionKind, AttentionSite, Place};
use crate::cpu::ops::{attn_dims, CpuFusedAttention};
use crate::error::Result;
use crate::fused::{self, GegluGrad, GegluOp};
use crate::nn::layout as ops;
use crate::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use crate::weights::Vb;

/// `softmax(q kᵀ · scale) v` for `[B, heads, L, d]` inputs, never handing out the
/// probabilities. This is the path every layer takes when no controller asks for them.
///
/// On the CPU in f32 it is one fused kernel (`crate::cpu::attention`): blocks of queries
/// whose scores stay in cache, and a backward pass that recomputes each block's
/// probabilities instead of keeping them (flash-attention style), so memory stays bounded
/// during null-text optimization (SD's full-resolution self-attention at 512 px has
/// 8 × 4096 × 4096 scores).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let cpu_f32 = [q, k, v]
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.rank() == 4);
    if cpu_f32 {
        return Ok(q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            CpuFusedAttention {
                scale: scale as f32,
                lse: std::sync::Mutex::new(None),
            },
        )?);
    }
    let probs = attention_probs(q, k, scale)?;
    Ok(probs.matmul(v)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::{Device, Var};

    fn rand(seed: u64, shape: (usize, usize, usize, usize)) -> Tensor {
        let n = shape.0 * shape.1 * shape.2 * shape.3;
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// The fused CPU attention equals the plain one (candle's ops and autograd), forward
    /// and backward, through the graph.
    #[test]
    fn fused_attention_matches_plain() {
        let (q, k, v) = (
            rand(1, (2, 3, 50, 8)),
            rand(2, (2, 3, 40, 8)),
            rand(3, (2, 3, 40, 8)),
        );
        let w = rand(4, (2, 3, 50, 8));
        let grads = |fused: bool| {
            let (qv, kv, vv) = (
                Var::from_tensor(&q).unwrap(),
                Var::from_tensor(&k).unwrap(),
                Var::from_tensor(&v).unwrap(),
            );
            let out = if fused {
                attention(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), 0.35).unwrap()
            } else {
                let scores = qv.as_tensor().matmul(&kv.as_tensor().t().unwrap()).unwrap();
                // candle's own differentiable ops: exp / sum
                let s = (scores * 0.35).unwrap();
                let s = s
                    .broadcast_sub(&s.max_keepdim(candle_core::D::Minus1).unwrap())
                    .unwrap()
                    .exp()
                    .unwrap();
                let p = s
                    .broadcast_div(&s.sum_keepdim(candle_core::D::Minus1).unwrap())
                    .unwrap();
                p.matmul(vv.as_tensor()).unwrap()
            };
            let loss = (&out * &w).unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            [
                out,
                g.get(qv.as_tensor()).unwrap().clone(),
                g.get(kv.as_tensor()).unwrap().clone(),
                g.get(vv.as_tensor()).unwrap().clone(),
            ]
        };
        let (a, b) = (grads(false), grads(true));
        for (x, y) in a.iter().zip(&b) {
            let e = max_abs_diff(x, y);
            assert!(e < 1e-5, "{e}");
        }
    }

    #[test]
    fn query_blocks_hold_at_most_the_budget() {
        // 2 images × 3 heads × 29 keys = 174 scores per query
        let (q, k) = ([2, 3, 37, 8], [2, 3, 29, 8]);
        assert_eq!(query_blocks(&q, &k, usize::MAX), vec![(0, 37)]);
        let blocks = query_blocks(&q, &k, 174 * 8 + 100);
        assert_eq!(blocks, vec![(0, 8), (8, 8), (16, 8), (24, 8), (32, 5)]);
        // one query at least, however small the budget
        assert_eq!(query_blocks(&q, &k, 1).len(), 37);
        // SD 1.5's 64² self-attention at 512², one image: 4 blocks of 1024 queries
        let (q, k) = ([1, 8, 4096, 40], [1, 8, 4096, 40]);
        assert_eq!(
            query_blocks(&q, &k, 1 << 25),
            vec![(0, 1024), (1024, 1024), (2048, 1024), (3072, 1024)]
        );
    }

    /// Queries in blocks give what all queries at once give, forward and backward, in f32
    /// and f16 (the keys' and values' gradients summed over the blocks).
    #[test]
    fn attention_in_query_blocks_matches_all_queries_at_once() {
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::F16, 2e-3)] {
            let at = |budget| Attention {
                score_budget: budget,
                ..layer(0.35)
            };
            // 2 × 3 × 40 scores per query: blocks of 9 queries
            let (whole, blocked) = (at(usize::MAX), at(2 * 3 * 40 * 9));
            let r = |seed, dims| rand(seed, dims).to_dtype(dtype).unwrap();
            let (q, k, v) = (
                r(1, (2, 3, 50, 8)),
                r(2, (2, 3, 40, 8)),
                r(3, (2, 3, 40, 8)),
            );
            let d_o = r(4, (2, 3, 50, 8));
            assert_eq!(
                query_blocks(q.dims(), k.dims(), blocked.score_budget).len(),
                6
            );
            let run = |a: &Attention| {
                let (o, lse) = a.tensor_core((&q, &k, &v), true, false).unwrap();
                let rec = AttnRecord {
                    q: q.clone(),
                    k: k.clone(),
                    v: v.clone(),
                    o: o.clone(),
                    kind: CoreKind::LogSumExp(lse.unwrap()),
                    query_varies: true,
                };
                let (dq, dk, dv) = a.core_backward(rec, &d_o).unwrap();
                [o, dq.unwrap(), dk, dv]
            };
            for (x, y) in run(&whole).iter().zip(&run(&blocked)) {
                assert_eq!(y.dtype(), dtype);
                let scale = x.to_dtype(DType::F64).unwrap().abs().unwrap();
                let scale = scale.max_all().unwrap().to_scalar::<f64>().unwrap();
                let e = max_abs_diff(x, y) / scale;
                println!("{dtype:?}: {e:.2e}");
                assert!(e < tol, "{dtype:?}: {e:.2e}");
            }
        }
    }

    fn layer(scale: f64) -> Attention {
        let linear = || Linear {
            weight: Tensor::zeros((8, 8), DType::F32, &Device::Cpu).unwrap(),
            bias: None,
        };
        Attention {
            to_q: linear(),
            to_k: linear(),
            to_v: linear(),
            to_out: linear(),
            heads: 3,
            scale,
            upcast: false,
            score_budget: usize::MAX,
            site: AttentionSite {
                place: Place::Mid,
                block: 0,
                transformer: 0,
                layer: 0,
                kind: AttentionKind::SelfAttention,
                index: 0,
                path: "mid".into(),
            },
        }
    }

    /// The tape's attention core on tensor ops with the fused steps (as GPUs run it; here
    /// with the steps' CPU implementations) equals the fused CPU attention, forward and
    /// backward.
    #[test]
    fn tensor_core_with_fused_steps_matches_the_fused_cpu_kernel() {
        let a = layer(0.35);
        let (q, k, v) = (
            rand(1, (2, 3, 50, 8)),
            rand(2, (2, 3, 40, 8)),
            rand(3, (2, 3, 40, 8)),
        );
        let d_o = rand(4, (2, 3, 50, 8));
        let (o1, rec1) = a
            .core((q.clone(), k.clone(), v.clone()), None, true)
            .unwrap();
        assert!(matches!(
            rec1.as_ref().unwrap().kind,
            CoreKind::FusedLogSumExp(_)
        ));
        let (o2, lse) = a.tensor_core((&q, &k, &v), true, false).unwrap();
        assert_eq!(
            lse.as_ref().unwrap().dtype(),
            DType::F32,
            "the fused steps ran"
        );
        let rec2 = AttnRecord {
            q,
            k,
            v,
            o: o2.clone(),
            kind: CoreKind::LogSumExp(lse.unwrap()),
            query_varies: true,
        };
        let (dq1, dk1, dv1) = a.core_backward(rec1.unwrap(), &d_o).unwrap();
        let (dq2, dk2, dv2) = a.core_backward(rec2, &d_o).unwrap();
        for (x, y) in [
            (o1, o2),
            (dq1.unwrap(), dq2.unwrap()),
            (dk1, dk2),
            (dv1, dv2),
        ] {
            let e = max_abs_diff(&x, &y);
            assert!(e < 1e-5, "{e}");
        }
    }
}

/// `softmax(q kᵀ · scale)` over the keys: `[B, heads, Lq, Lk]`.
pub fn attention_probs(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = q.matmul(&k.t()?)?;
    crate::nn::scaled_softmax_last_dim(&scores, scale)
}

/// Multi-head attention, self or cross, as diffusers' `Attention` with the default processor.
pub struct Attention {
    pub(crate) to_q: Linear,
    pub(crate) to_k: Linear,
    pub(crate) to_v: Linear,
    pub(crate) to_out: Linear,
    pub(crate) heads: usize,
    pub(crate) scale: f64,
    pub(crate) upcast: bool,
    /// The most scores the tensor-op core holds at once ([`score_budget`]).
    pub(crate) score_budget: usize,
    pub site: AttentionSite,
}

/// The most scores an attention core on tensor ops computes at once, in all heads and
/// images together: beyond it the queries go in blocks, each with its scores, probabilities
/// and (backward) their gradients, so that these transient matrices stay within the budget
/// however large the image. SD 1.5's 64² self-attention at 512² has 8 × 4096 × 4096 scores
/// per image (256 MiB in f16, and the backward pass holds four such matrices); the budget
/// is 2²⁵ scores (64 MiB in f16). `NULLTEXT_ATTENTION_SCORES=N` sets another (0: no
/// blocks), read once.
pub fn score_budget() -> usize {
    static BUDGET: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| match std::env::var("NULLTEXT_ATTENTION_SCORES") {
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(0) => usize::MAX,
            Ok(n) => n,
            Err(_) => panic!("NULLTEXT_ATTENTION_SCORES={v}: a number of scores expected"),
        },
        Err(_) => 1 << 25,
    })
}

/// The blocks of queries `(first, count)` of an attention of queries `[B, heads, Lq, d]`
/// and keys `[B, heads, Lk, d]` with at most `budget` scores each (at least one query).
fn query_blocks(q: &[usize], k: &[usize], budget: usize) -> Vec<(usize, usize)> {
    let (lq, per_query) = match (q, k) {
        ([b, h, lq, _], [_, _, lk, _]) => (*lq, b * h * lk),
        _ => return vec![(0, q.get(2).copied().unwrap_or(0))],
    };
    let rows = (budget / per_query.max(1)).clamp(1, lq.max(1));
    (0..lq)
        .step_by(rows)
        .map(|first| (first, rows.min(lq - first)))
        .collect()
}

impl Attention {
    pub fn load(
        vb: &Vb,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        dim_head: usize,
        upcast: bool,
        site: AttentionSite,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        Ok(Self {
            to_q: Linear::load(&vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(&vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(&vb.pp("to_out.0"), inner, query_dim, true)?,
            heads,
            scale: (dim_head as f64).powf(-0.5),
            upcast,
            score_budget: score_budget(),
            site,
        })
    }

    /// The queries of rows `x` `[B, L, C]`: `[B, heads, L, d]`, in f32 where the model
    /// upcasts its attention.
    pub(crate) fn queries(&self, x: &Tensor) -> Result<Tensor> {
        self.upcast(ops::split_heads(&self.to_q.forward(x)?, self.heads)?)
    }

    /// The keys (upcast as [`Self::queries`]) and values of rows `src` `[B, L, D]`.
    pub(crate) fn keys_values(&self, src: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = self.upcast(ops::split_heads(&self.to_k.forward(src)?, self.heads)?)?;
        let v = ops::split_heads(&self.to_v.forward(src)?, self.heads)?;
        Ok((k, v))
    }

    /// Whether scores in `dtype` are computed in f32 (a half-precision dtype, and a model
    /// that upcasts its attention).
    fn upcasts(&self, dtype: DType) -> bool {
        self.upcast && matches!(dtype, DType::F16 | DType::BF16)
    }

    fn upcast(&self, t: Tensor) -> Result<Tensor> {
        Ok(match self.upcasts(t.dtype()) {
            true => t.to_dtype(DType::F32)?,
            false => t,
        })
    }

    /// `softmax(q kᵀ · scale) v` `[B, heads, Lq, d]` in `v`'s dtype, with what its backward
    /// pass needs when `record`. With `control`, the controller sees and may replace the
    /// probabilities; otherwise the fastest kernel runs (on the CPU in f32 the fused one,
    /// `crate::cpu::attention`), and a record keeps each query's log-sum-exp, not the
    /// probabilities.
    pub(crate) fn core(
        &self,
        (q, k, v): (Tensor, Tensor, Tensor),
        control: Option<(&mut dyn AttentionControl, &AttentionCall)>,
        record: bool,
    ) -> Result<(Tensor, Option<AttnRecord>)> {
        let dtype = v.dtype();
        let keep = |o: &Tensor, kind: CoreKind, (q, k, v): (Tensor, Tensor, Tensor)| {
            record.then(|| AttnRecord {
                q,
                k,
                v,
                o: o.clone(),
                kind,
                query_varies: true,
            })
        };
        if let Some((control, call)) = control {
            if !record {
                let probs = attention_probs(&q, &k, self.scale)?.to_dtype(dtype)?;
                return Ok((control.edit(call, probs)?.matmul(&v)?, None));
            }
            // candle's autograd differentiates through the controller's edit
            let leaves = (
                Var::from_tensor(&q.detach())?,
                Var::from_tensor(&k.detach())?,
                Var::from_tensor(&v.detach())?,
            );
            let probs = attention_probs(leaves.0.as_tensor(), leaves.1.as_tensor(), self.scale)?;
            let out = control
                .edit(call, probs.to_dtype(dtype)?)?
                .matmul(leaves.2.as_tensor())?;
            let o = out.detach();
            let rec = keep(&o, CoreKind::Graph { leaves, out }, (q, k, v));
            return Ok((o, rec));
        }
        if [&q, &k, &v].iter().all(|t| ops::host(t)) {
            let n = attn_dims(q.dims(), k.dims(), v.dims())?;
            let (o, lse) = ops::with_f32(&q, |qs| {
                ops::with_f32(&k, |ks| {
                    ops::with_f32(&v, |vs| {
                        crate::cpu::attention::forward(qs, ks, vs, n, self.scale as f32)
                    })
                })
            })???;
            let (b, h, lq, _) = q.dims4()?;
            let o = Tensor::from_vec(o, (b, h, lq, n.dv), q.device())?;
            let lse = Tensor::from_vec(lse, (b, h, lq), q.device())?;
            let rec = keep(&o, CoreKind::FusedLogSumExp(lse), (q, k, v));
            return Ok((o, rec));
        }
        let tracked = [&q, &k, &v].iter().any(|t| t.track_op());
        if !record && !self.upcasts(dtype) && (tracked || !fused::applies(&v)) {
            // candle's graph: the fused kernel on the CPU, as one differentiable node
            return Ok((attention(&q, &k, &v, self.scale)?, None));
        }
        let (o, lse) = self.tensor_core((&q, &k, &v), record, tracked)?;
        let rec = lse.and_then(|lse| keep(&o, CoreKind::LogSumExp(lse), (q, k, v)));
        Ok((o, rec))
    }

    /// [`Self::core`] on tensor ops, with each query's log-sum-exp when `record`. Where
    /// [`fused::applies`] and nothing is `tracked` by candle's graph, the fused kernels run
    /// between the products, recording or not, so that a tape's pass and a plain pass give
    /// the same values.
    fn tensor_core(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        record: bool,
        tracked: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let blocks = query_blocks(q.dims(), k.dims(), self.score_budget);
        if tracked || blocks.len() == 1 {
            return self.tensor_core_block((q, k, v), record, tracked);
        }
        let (mut o, mut lse) = (Vec::new(), Vec::new());
        for (first, count) in blocks {
            let qb = q.narrow(2, first, count)?.contiguous()?;
            let (ob, lseb) = self.tensor_core_block((&qb, k, v), record, false)?;
            o.push(ob);
            lse.extend(lseb);
        }
        let lse = record.then(|| Tensor::cat(&lse, 2)).transpose()?;
        Ok((Tensor::cat(&o, 2)?, lse))
    }

    /// [`Self::tensor_core`] for all its queries at once.
    fn tensor_core_block(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        record: bool,
        tracked: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dtype = v.dtype();
        let scores = q.matmul(&k.t()?)?;
        if !tracked && fused::applies(&scores) {
            let (probs, lse) = fused::softmax_with_logsumexp(&scores, self.scale)?;
            return Ok((probs.to_dtype(dtype)?.matmul(v)?, record.then_some(lse)));
        }
        let probs = crate::nn::scaled_softmax_last_dim(&scores, self.scale)?;
        let o = probs.to_dtype(dtype)?.matmul(v)?;
        if !record {
            return Ok((o, None));
        }
        // Each query's log-sum-exp of the scaled scores, read off its largest probability:
        // exp(s_max − lse) ≥ 1/keys, so its logarithm loses no precision.
        let lse = ((scores.max_keepdim(D::Minus1)? * self.scale)?
            - probs.max_keepdim(D::Minus1)?.log()?)?;
        Ok((o, Some(lse)))
    }

    /// The gradients of [`Self::core`]'s queries (`None` where they are constants), keys and
    /// values given the gradient `d_o` of its output, in `d_o`'s dtype.
    pub(crate) fn core_backward(
        &self,
        rec: AttnRecord,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let dtype = d_o.dtype();
        let AttnRecord {
            q,
            k,
            v,
            o,
            kind,
            query_varies,
        } = rec;
        match kind {
            CoreKind::LogSumExp(lse) => {
                let blocks = query_blocks(q.dims(), k.dims(), self.score_budget);
                if blocks.len() == 1 {
                    return self.lse_backward((q, k, v, o, &lse), query_varies, d_o);
                }
                // block by block: the queries' gradients side by side, the keys' and
                // values' summed in f32
                let (mut dq, mut dk, mut dv) = (Vec::new(), None, None);
                let sum = |acc: Option<Tensor>, g: Tensor| -> Result<Option<Tensor>> {
                    let g = g.to_dtype(DType::F32)?;
                    Ok(Some(match acc {
                        Some(acc) => (acc + g)?,
                        None => g,
                    }))
                };
                for (first, count) in blocks {
                    let rows = |t: &Tensor| -> Result<Tensor> {
                        Ok(t.narrow(2, first, count)?.contiguous()?)
                    };
                    let (dqb, dkb, dvb) = self.lse_backward(
                        (rows(&q)?, k.clone(), v.clone(), rows(&o)?, &rows(&lse)?),
                        query_varies,
                        &rows(d_o)?,
                    )?;
                    dq.extend(dqb);
                    dk = sum(dk, dkb)?;
                    dv = sum(dv, dvb)?;
                }
                let whole = |g: Option<Tensor>| -> Result<Tensor> {
                    Ok(g.expect("one block at least").to_dtype(dtype)?)
                };
                let dq = query_varies.then(|| Tensor::cat(&dq, 2)).transpose()?;
                Ok((dq, whole(dk)?, whole(dv)?))
            }
            CoreKind::FusedLogSumExp(lse) => {
                let n = attn_dims(q.dims(), k.dims(), v.dims())?;
                let (dq, dk, dv) = ops::with_f32(&q, |qs| {
                    ops::with_f32(&k, |ks| {
                        ops::with_f32(&v, |vs| {
                            ops::with_f32(&o, |os| {
                                ops::with_f32(&lse, |ls| {
                                    ops::with_f32(d_o, |gs| {
                                        crate::cpu::attention::backward(
                                            qs,
                                            ks,
                                            vs,
                                            os,
                                            ls,
                                            gs,
                                            n,
                                            self.scale as f32,
                                        )
                                    })
                                })
                            })
                        })
                    })
                })??????;
                let dev = q.device();
                Ok((
                    query_varies
                        .then(|| Tensor::from_vec(dq, q.dims(), dev))
                        .transpose()?,
                    Tensor::from_vec(dk, k.dims(), dev)?,
                    Tensor::from_vec(dv, v.dims(), dev)?,
                ))
            }
            CoreKind::Graph { leaves, out } => {
                let loss = (out.to_dtype(DType::F32)? * d_o.to_dtype(DType::F32)?)?.sum_all()?;
                let grads = loss.backward()?;
                let grad = |var: &Var| -> Result<Tensor> {
                    Ok(match grads.get(var.as_tensor()) {
                        Some(g) => g.to_dtype(dtype)?,
                        None => var.as_tensor().zeros_like()?.to_dtype(dtype)?,
                    })
                };
                let dq = query_varies.then(|| grad(&leaves.0)).transpose()?;
                Ok((dq, grad(&leaves.1)?, grad(&leaves.2)?))
            }
        }
    }

    /// [`Self::core_backward`] from each query's log-sum-exp: the probabilities again, from
    /// the scores.
    fn lse_backward(
        &self,
        (q, k, v, o, lse): (Tensor, Tensor, Tensor, Tensor, &Tensor),
        query_varies: bool,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let s = q.matmul(&k.t()?)?;
        let p = match fused::applies(&s) {
            true => fused::probs(&s, &lse.to_dtype(DType::F32)?, self.scale)?,
            false => ((s * self.scale)?.broadcast_sub(&lse.to_dtype(q.dtype())?)?).exp()?,
        };
        self.probs_backward(p, (q, k, v, o), query_varies, d_o)
    }

    /// [`Self::core_backward`] given the probabilities `p` (in the scores' dtype) and the
    /// core's inputs and output.
    fn probs_backward(
        &self,
        p: Tensor,
        (q, k, v, o): (Tensor, Tensor, Tensor, Tensor),
        query_varies: bool,
        d_o: &Tensor,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let dtype = d_o.dtype();
        let dv = p.to_dtype(dtype)?.t()?.matmul(d_o)?;
        let dp = d_o.matmul(&v.t()?)?;
        // softmax: dS = P ⊙ (dP − Σⱼ Pᵢⱼ dPᵢⱼ), and Σⱼ Pᵢⱼ dPᵢⱼ = dOᵢ · Oᵢ; in the
        // scores' dtype (f32 where the attention is upcast)
        let wide = q.dtype();
        let dp = dp.to_dtype(wide)?;
        let ds = match fused::applies_with(&p, &[&dp]) && fused::applies_with(d_o, &[&o]) {
            true => fused::softmax_grad(&p, &dp, (d_o, &o), self.scale)?,
            false => {
                let dot = (d_o * &o)?.sum_keepdim(D::Minus1)?.to_dtype(wide)?;
                ((&p * dp.broadcast_sub(&dot)?)? * self.scale)?
            }
        };
        let dk = ds.t()?.matmul(&q)?.to_dtype(dtype)?;
        let dq = match query_varies {
            true => Some(ds.matmul(&k)?.to_dtype(dtype)?),
            false => None,
        };
        Ok((dq, dk, dv))
    }
}

/// What one attention core keeps for its backward pass.
pub(crate) struct AttnRecord {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    kind: CoreKind,
    /// Whether the queries depend on the context (their gradient is needed).
    pub(crate) query_varies: bool,
}

enum CoreKind {
    /// The fused CPU kernel's log-sum-exp per query `[B, heads, Lq]`: its backward
    /// recomputes each block's probabilities.
    FusedLogSumExp(Tensor),
    /// Tensor ops (other devices and dtypes): each query's log-sum-exp of the scaled scores
    /// `[B, heads, Lq, 1]`, in the scores' dtype, from which the backward pass recomputes
    /// the probabilities instead of keeping them.
    LogSumExp(Tensor),
    /// A controller edited the probabilities: candle's autograd from these leaves (q, k,
    /// v) through its edit to the output.
    Graph {
        leaves: (Var, Var, Var),
        out: Tensor,
    },
}

/// GEGLU feed-forward: `Linear(dim, 2·inner)` → `h · gelu(gate)` → `Linear(inner, dim)`.
pub(crate) struct FeedForward {
    pub(crate) proj: Linear,
    pub(crate) out: Linear,
}

impl FeedForward {
    fn load(vb: &Vb, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            proj: Linear::load(&vb.pp("net.0.proj"), dim, inner * 2, true)?,
            out: Linear::load(&vb.pp("net.2"), inner, dim, true)?,
        })
    }

    /// `a · gelu(b)` for the projection `ff = [a | b]` `[B, L, 2·inner]`.
    pub(crate) fn geglu(ff: &Tensor) -> Result<Tensor> {
        if fused::applies(ff) {
            return Ok(ff.contiguous()?.apply_op1(GegluOp)?);
        }
        let half = ff.dim(D::Minus1)? / 2;
        let (hidden, gate) = (ff.narrow(2, 0, half)?, ff.narrow(2, half, half)?);
        Ok((hidden * gate.gelu_erf()?)?)
    }

    /// The gradient of [`Self::geglu`]'s input `ff` given the gradient `g` of its output:
    /// `[g · gelu(b) | g · a · gelu′(b)]`.
    pub(crate) fn geglu_grad(ff: &Tensor, g: &Tensor) -> Result<Tensor> {
        if !ff.track_op() && !g.track_op() && fused::applies_with(ff, &[g]) {
            return Ok(ff
                .contiguous()?
                .apply_op2_no_bwd(&g.contiguous()?, &GegluGrad)?);
        }
        let half = ff.dim(D::Minus1)? / 2;
        let (hidden, gate) = (ff.narrow(2, 0, half)?, ff.narrow(2, half, half)?);
        let dh = (g * gate.gelu_erf()?)?;
        // gelu′(x) = Φ(x) + x φ(x)
        let cdf = (((&gate * std::f64::consts::FRAC_1_SQRT_2)?.erf()? + 1.0)? * 0.5)?;
        let pdf = ((gate.sqr()? * -0.5)?.exp()?
            * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2))?;
        let slope = (cdf + (pdf * &gate)?)?;
        let dgate = ((g * hidden)? * slope)?;
        Ok(Tensor::cat(&[dh, dgate], 2)?)
    }
}

/// Self-attention, cross-attention and feed-forward, each with a pre-norm and a residual.
pub struct BasicTransformerBlock {
    pub(crate) norm1: LayerNorm,
    pub(crate) attn1: Attention,
    pub(crate) norm2: LayerNorm,
    pub(crate) attn2: Attention,
    pub(crate) norm3: LayerNorm,
    pub(crate) ff: FeedForward,
}

/// Where a `Transformer2DModel` sits: place, block and index within the block.
#[derive(Debug, Clone, Copy)]
pub struct TransformerPlace {
    pub place: Place,
    pub block: usize,
    pub transformer: usize,
}

impl BasicTransformerBlock {
    #[allow(clippy::too_many_arguments)]
    fn load(
        vb: &Vb,
        dim: usize,
        heads: usize,
        dim_head: usize,
        context_dim: usize,
        upcast: bool,
        at: TransformerPlace,
        layer: usize,
        next_index: &mut usize,
    ) -> Result<Self> {
        let mut site = |kind: AttentionKind, name: &str| {
            let s = AttentionSite {
                place: at.place,
                block: at.block,
                transformer: at.transformer,
                layer,
                kind,
                index: *next_index,
                path: vb.pp(name).prefix().to_string(),
            };
            *next_index += 1;
            s
        };
        let s1 = site(AttentionKind::SelfAttention, "attn1");
        let s2 = site(AttentionKind::CrossAttention, "attn2");
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, dim_head, upcast, s1)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(
                &vb.pp("attn2"),
                dim,
                context_dim,
                heads,
                dim_head,
                upcast,
                s2,
            )?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
        })
    }

    pub fn sites(&self) -> [&AttentionSite; 2] {
        [&self.attn1.site, &self.attn2.site]
    }
}

pub(crate) enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` for continuous inputs: norm, project in, transformer blocks,
/// project out, residual.
pub struct Transformer2DModel {
    pub(crate) norm: GroupNorm,
    pub(crate) proj_in: Projection,
    pub(crate) blocks: Vec<BasicTransformerBlock>,
    pub(crate) proj_out: Projection,
}

/// Shape parameters of a `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerShape {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
    pub upcast: bool,
}

impl Transformer2DModel {
    pub fn load(
        vb: &Vb,
        s: TransformerShape,
        at: TransformerPlace,
        next_index: &mut usize,
    ) -> Result<Self> {
        let c = s.channels;
        if s.heads == 0 || !c.is_multiple_of(s.heads) {
            return Err(crate::Error::Unsupported(format!(
                "{}: {c} channels do not divide into {} heads",
                vb.prefix(),
                s.heads
            )));
        }
        let dim_head = c / s.heads;
        let proj = |name: &str| -> Result<Projection> {
            Ok(if s.linear_projection {
                Projection::Linear(Linear::load_maybe_conv(&vb.pp(name), c, c)?)
            } else {
                Projection::Conv(Conv2d::load(&vb.pp(name), c, c, 1, 1, 0)?)
            })
        };
        let blocks = (0..s.layers)
            .map(|i| {
                BasicTransformerBlock::load(
                    &vb.pp(format!("transformer_blocks.{i}")),
                    c,
                    s.heads,
                    dim_head,
                    s.context_dim,
                    s.upcast,
                    at,
                    i,
                    next_index,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(&vb.pp("norm"), s.groups, c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    pub fn sites(&self) -> impl Iterator<Item = &AttentionSite> {
        self.blocks.iter().flat_map(|b| b.sites())
    }
}
