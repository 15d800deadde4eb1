//! Re-attaching a value computed without a graph to its input, with an explicit backward.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Shape, Storage, Tensor,
};

type Bwd = dyn Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync;

/// A custom op whose forward hands out a precomputed value and whose backward is `bwd`.
struct WithGrad {
    value: Mutex<Option<Tensor>>,
    bwd: Arc<Bwd>,
}

impl WithGrad {
    fn take(&self) -> candle_core::Result<Tensor> {
        self.value
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attach_grad value used twice".into()))
    }
}

fn storage_copy(t: &Tensor) -> candle_core::Result<(Storage, Shape)> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let shape = layout.shape().clone();
    let owned = match (&*storage, layout.start_offset()) {
        (Storage::Cpu(s), 0) if s_len(s) == shape.elem_count() => Storage::Cpu(s.clone()),
        _ => {
            drop(storage);
            let c = t.copy()?;
            let (storage, _) = c.storage_and_layout();
            return Ok((storage.try_clone(c.layout())?, shape));
        }
    };
    Ok((owned, shape))
}

fn s_len(s: &CpuStorage) -> usize {
    match s {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F64(v) => v.len(),
        _ => usize::MAX,
    }
}

impl CustomOp1 for WithGrad {
    fn name(&self) -> &'static str {
        "with-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match storage_copy(&self.take()?)? {
            (Storage::Cpu(s), shape) => Ok((s, shape)),
            _ => candle_core::bail!("attach_grad: value not on the cpu"),
        }
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let v = self.take()?.contiguous()?;
        let (storage, layout) = v.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attach_grad: value not on the cuda device"),
        }
    }

    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(MetalStorage, Shape)> {
        let v = self.take()?.contiguous()?;
        let (storage, layout) = v.storage_and_layout();
        match &*storage {
            Storage::Metal(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("attach_grad: value not on the metal device"),
        }
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.bwd)(grad_res, res)?))
    }
}

/// Returns `value` (computed from `x` without a graph) as a function of `x` whose backward
/// is `bwd(grad_of_value, value)`. Without a graph on `x`, returns `value` as it is.
pub fn attach_grad(
    x: &Tensor,
    value: Tensor,
    bwd: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(WithGrad {
        value: Mutex::new(Some(value)),
        bwd: Arc::new(bwd),
    })
}
