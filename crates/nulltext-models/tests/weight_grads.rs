//! The weights' gradients of the CPU layers (used when training) against candle's own
//! differentiable ops computing the same function.

mod common;

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

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let d = (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let m = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    d / m.max(1e-6)
}

#[test]
fn linear() {
    let w = Var::from_tensor(&noise(1, &[7, 5])).unwrap();
    let b = Var::from_tensor(&noise(2, &[7])).unwrap();
    let x = Var::from_tensor(&noise(3, &[2, 3, 5])).unwrap();
    let g = noise(4, &[2, 3, 7]);
    let st = store(&[("l.weight", &w), ("l.bias", &b)]);
    let layer = Linear::load(&st.root().pp("l"), 5, 7, true).unwrap();
    let loss = (layer.forward(x.as_tensor()).unwrap() * &g)
        .unwrap()
        .sum_all()
        .unwrap();
    let got = loss.backward().unwrap();
    let want = (x
        .as_tensor()
        .broadcast_matmul(&w.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_add(b.as_tensor())
        .unwrap()
        * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for t in [w.as_tensor(), b.as_tensor(), x.as_tensor()] {
        let e = max_rel(got.get(t).unwrap(), want.get(t).unwrap());
        assert!(e < 1e-5, "linear gradient off by {e}");
    }
}

/// `⟨conv(x, W) + b, g⟩` is linear in each of `x`, `W` and `b`: each entry of a gradient is
/// the loss at the unit tensor for that entry, with the other arguments as they are —
/// computed with candle's forward convolution (its backward mishandles odd sizes at stride 2).
#[test]
fn conv2d() {
    for (stride, padding, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1)] {
        let w = Var::from_tensor(&noise(5, &[6, 4, k, k])).unwrap();
        let b = Var::from_tensor(&noise(6, &[6])).unwrap();
        let x = Var::from_tensor(&noise(7, &[2, 4, 9, 8])).unwrap();
        let st = store(&[("c.weight", &w), ("c.bias", &b)]);
        let conv = Conv2d::load(&st.root().pp("c"), 4, 6, k, stride, padding).unwrap();
        let y = conv.forward(x.as_tensor()).unwrap();
        let g = noise(8, y.dims());
        let got = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
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
    let b = Var::from_tensor(&noise(10, &[8])).unwrap();
    let x = Var::from_tensor(&noise(11, &[2, 8, 5, 3])).unwrap();
    let g = noise(12, &[2, 8, 5, 3]);
    let st = store(&[("n.weight", &w), ("n.bias", &b)]);
    let norm = GroupNorm::load(&st.root().pp("n"), 4, 8, 1e-5).unwrap();
    for silu in [false, true] {
        let y = if silu {
            norm.forward_silu(x.as_tensor())
        } else {
            norm.forward(x.as_tensor())
        };
        let got = (y.unwrap() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
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
        let want = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [w.as_tensor(), b.as_tensor(), x.as_tensor()] {
            let e = max_rel(got.get(t).unwrap(), want.get(t).unwrap());
            assert!(e < 1e-4, "group norm (silu {silu}) gradient off by {e}");
        }
    }
}

#[test]
fn layer_norm() {
    let w = Var::from_tensor(&(noise(13, &[6]) + 1.0).unwrap()).unwrap();
    let b = Var::from_tensor(&noise(14, &[6])).unwrap();
    let x = Var::from_tensor(&noise(15, &[3, 4, 6])).unwrap();
    let g = noise(16, &[3, 4, 6]);
    let st = store(&[("n.weight", &w), ("n.bias", &b)]);
    let norm = LayerNorm::load(&st.root().pp("n"), 6, 1e-5).unwrap();
    let got = (norm.forward(x.as_tensor()).unwrap() * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
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
    let want = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
    for t in [w.as_tensor(), b.as_tensor(), x.as_tensor()] {
        let e = max_rel(got.get(t).unwrap(), want.get(t).unwrap());
        assert!(e < 1e-4, "layer norm gradient off by {e}");
    }
}
