//! The weights' gradients of the CPU layers (used when training) against candle's own
//! differentiable ops computing the same function.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use common::noise;
use nulltext_models::nn::{Conv2d, GroupNorm, LayerNorm, Linear};
use nulltext_models::weights::WeightStore;

/// A store whose tensors are the given variables.
fn store(vars: &[(&str, &Var)]) -> WeightStore {
    let mut s = WeightStore::open(&[], &Device::Cpu, DType::F32).unwrap();
    for (name, v) in vars {
        s.insert(name.to_string(), v.as_tensor().clone());
    }
    s
}

fn var(seed: u64, shape: &[usize]) -> Var {
    Var::from_tensor(&noise(seed, shape)).unwrap()
}

/// The gradients of ⟨y, g⟩.
fn grads(y: Tensor, g: &Tensor) -> GradStore {
    (y * g).unwrap().sum_all().unwrap().backward().unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Asserts max |got − want| ≤ tol · max |want| for the gradient of each of `vars`.
fn assert_same_grads(what: &str, got: &GradStore, want: &GradStore, vars: &[&Var], tol: f32) {
    for v in vars {
        let (a, b) = (
            got.get(v.as_tensor()).unwrap(),
            want.get(v.as_tensor()).unwrap(),
        );
        let e = max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-6);
        assert!(e < tol, "{what} gradient off by {e}");
    }
}

#[test]
fn linear() {
    let (w, b, x) = (var(1, &[7, 5]), var(2, &[7]), var(3, &[2, 3, 5]));
    let g = noise(4, &[2, 3, 7]);
    let st = store(&[("l.weight", &w), ("l.bias", &b)]);
    let layer = Linear::load(&st.root().pp("l"), 5, 7, true).unwrap();
    let got = grads(layer.forward(x.as_tensor()).unwrap(), &g);
    let y = x
        .as_tensor()
        .broadcast_matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    assert_same_grads("linear", &got, &grads(y, &g), &[&w, &b, &x], 1e-5);
}

/// `⟨conv(x, W) + b, g⟩` is linear in each of `x`, `W` and `b`: each entry of a gradient is
/// the loss at the unit tensor for that entry, with the other arguments as they are —
/// computed with candle's forward convolution (its backward mishandles odd sizes at stride 2).
#[test]
fn conv2d() {
    for (stride, padding, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1)] {
        let (w, b, x) = (var(5, &[6, 4, k, k]), var(6, &[6]), var(7, &[2, 4, 9, 8]));
        let st = store(&[("c.weight", &w), ("c.bias", &b)]);
        let conv = Conv2d::load(&st.root().pp("c"), 4, 6, k, stride, padding).unwrap();
        let y = conv.forward(x.as_tensor()).unwrap();
        let g = noise(8, y.dims());
        let got = grads(y, &g);
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| -> f64 {
            let y = x
                .conv2d(w, padding, stride, 1, 1)
                .unwrap()
                .broadcast_add(&b.reshape((1, 6, 1, 1)).unwrap())
                .unwrap();
            (y * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64
        };
        let unit = |t: &Tensor, i: usize| -> Tensor {
            let mut v = vec![0f32; t.elem_count()];
            v[i] = 1.0;
            Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
        };
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let zb = bt.zeros_like().unwrap();
        type Entry<'a> = (&'a Tensor, Box<dyn Fn(usize) -> f64 + 'a>);
        let cases: [Entry; 3] = [
            (wt, Box::new(|i| loss(xt, &unit(wt, i), &zb))),
            (
                bt,
                Box::new(|i| loss(&xt.zeros_like().unwrap(), wt, &unit(bt, i))),
            ),
            (xt, Box::new(|i| loss(&unit(xt, i), wt, &zb))),
        ];
        for (t, want) in cases {
            let gv: Vec<f32> = got
                .get(t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(gv.len(), t.elem_count());
            for (i, v) in gv.iter().enumerate() {
                let w = want(i);
                assert!(
                    (*v as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "conv (stride {stride}, k {k}): gradient entry {i} {v} vs {w}"
                );
            }
        }
    }
}

#[test]
fn group_norm() {
    let w = Var::from_tensor(&(noise(9, &[8]) + 1.0).unwrap()).unwrap();
    let (b, x) = (var(10, &[8]), var(11, &[2, 8, 5, 3]));
    let g = noise(12, &[2, 8, 5, 3]);
    let st = store(&[("n.weight", &w), ("n.bias", &b)]);
    let norm = GroupNorm::load(&st.root().pp("n"), 4, 8, 1e-5).unwrap();
    for silu in [false, true] {
        let y = if silu {
            norm.forward_silu(x.as_tensor())
        } else {
            norm.forward(x.as_tensor())
        };
        let got = grads(y.unwrap(), &g);
        let xs = x.as_tensor().reshape((2, 4, 30)).unwrap();
        let xc = xs.broadcast_sub(&xs.mean_keepdim(2).unwrap()).unwrap();
        let rstd = (xc.sqr().unwrap().mean_keepdim(2).unwrap() + 1e-5)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let mut y = xc
            .broadcast_mul(&rstd)
            .unwrap()
            .reshape((2, 8, 5, 3))
            .unwrap()
            .broadcast_mul(&w.as_tensor().reshape((1, 8, 1, 1)).unwrap())
            .unwrap()
            .broadcast_add(&b.as_tensor().reshape((1, 8, 1, 1)).unwrap())
            .unwrap();
        if silu {
            y = y.silu().unwrap();
        }
        let what = format!("group norm (silu {silu})");
        assert_same_grads(&what, &got, &grads(y, &g), &[&w, &b, &x], 1e-4);
    }
}

#[test]
fn layer_norm() {
    let w = Var::from_tensor(&(noise(13, &[6]) + 1.0).unwrap()).unwrap();
    let (b, x) = (var(14, &[6]), var(15, &[3, 4, 6]));
    let g = noise(16, &[3, 4, 6]);
    let st = store(&[("n.weight", &w), ("n.bias", &b)]);
    let norm = LayerNorm::load(&st.root().pp("n"), 6, 1e-5).unwrap();
    let got = grads(norm.forward(x.as_tensor()).unwrap(), &g);
    let xs = x.as_tensor();
    let xc = xs
        .broadcast_sub(&xs.mean_keepdim(D::Minus1).unwrap())
        .unwrap();
    let rstd = (xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + 1e-5)
        .unwrap()
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    let y = xc
        .broadcast_mul(&rstd)
        .unwrap()
        .broadcast_mul(w.as_tensor())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap();
    assert_same_grads("layer norm", &got, &grads(y, &g), &[&w, &b, &x], 1e-4);
}
