//! Data-parallel training over processes, one GPU each: gradients averaged by NCCL's
//! all-reduce through candle's own cudarc (the communicator candle-examples'
//! multiprocess example uses), with no communication layer of ours.

use crate::trainer::GradientSync;
use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{
    bail, CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, Var,
};
use std::path::Path;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// One process of a data-parallel run of `world` processes.
pub struct DataParallel {
    comm: Rc<Comm>,
    rank: usize,
    world: usize,
}

/// NCCL's unique id is 128 bytes.
const ID_BYTES: usize = 128;

impl DataParallel {
    /// Joins the run as `rank` on `device` (a CUDA device, usually `cuda:rank`): rank 0
    /// writes NCCL's unique id to `id_file` (atomically), the others wait up to two
    /// minutes for it. Every rank must build the same model from the same seed.
    pub fn join(rank: usize, world: usize, id_file: &Path, device: &Device) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("data-parallel training: rank {rank} of a world of {world}");
        }
        let Device::Cuda(dev) = device else {
            bail!("data-parallel training needs a CUDA device, got {device:?}");
        };
        let nccl = |e: candle_core::cuda_backend::cudarc::nccl::result::NcclError| {
            candle_core::Error::msg(format!("NCCL (rank {rank} of {world}): {e:?}"))
        };
        let id = if rank == 0 {
            let id = Id::new().map_err(nccl)?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            scoreguide_checkpoint::write_atomic(id_file, &bytes).map_err(|e| {
                candle_core::Error::msg(format!(
                    "writing the NCCL id to {}: {e}",
                    id_file.display()
                ))
            })?;
            id
        } else {
            let start = Instant::now();
            let bytes = loop {
                match std::fs::read(id_file) {
                    Ok(b) if b.len() == ID_BYTES => break b,
                    _ if start.elapsed() > Duration::from_secs(120) => bail!(
                        "rank {rank}: no NCCL id in {} after two minutes (is rank 0 running?)",
                        id_file.display()
                    ),
                    _ => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            let mut internal = [0 as std::ffi::c_char; ID_BYTES];
            for (i, b) in internal.iter_mut().zip(bytes) {
                *i = b as std::ffi::c_char;
            }
            Id::uninit(internal)
        };
        let comm = Comm::from_rank(dev.cuda_stream(), rank, world, id).map_err(nccl)?;
        Ok(Self {
            comm: Rc::new(comm),
            rank,
            world,
        })
    }

    /// The mean of `t` over every rank (each rank calls it with a tensor of one shape).
    pub fn mean(&self, t: &Tensor) -> Result<Tensor> {
        let sum = t.contiguous()?.apply_op1_no_bwd(&AllReduceSum {
            comm: self.comm.clone(),
        })?;
        sum / self.world as f64
    }
}

impl GradientSync for DataParallel {
    fn sync(&self, grads: &mut GradStore, vars: &[(String, Var)]) -> Result<()> {
        for (_, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let mean = self.mean(g)?;
                grads.insert(v.as_tensor(), mean);
            }
        }
        Ok(())
    }

    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }
}

/// NCCL's all-reduce (sum) as a candle op, as candle-examples' multiprocess example
/// wraps it.
struct AllReduceSum {
    comm: Rc<Comm>,
}

// NCCL communicators are not thread-safe; each process drives its own from one thread,
// which is how the trainer calls it.
unsafe impl Sync for AllReduceSum {}
unsafe impl Send for AllReduceSum {}

impl CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((start, end)) = l.contiguous_offsets() else {
            bail!("NCCL all-reduce: the tensor must be contiguous");
        };
        let dev = s.device().clone();
        let fail = |e| candle_core::Error::msg(format!("NCCL all-reduce: {e:?}"));
        let out = match s.dtype() {
            DType::F32 => {
                let src = s.as_cuda_slice::<f32>()?.slice(start..end);
                // SAFETY: every element is written by the all-reduce before it is read.
                let mut dst = unsafe { dev.alloc::<f32>(end - start) }?;
                self.comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(fail)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            DType::F64 => {
                let src = s.as_cuda_slice::<f64>()?.slice(start..end);
                // SAFETY: as above.
                let mut dst = unsafe { dev.alloc::<f64>(end - start) }?;
                self.comm
                    .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                    .map_err(fail)?;
                CudaStorage::wrap_cuda_slice(dst, dev)
            }
            other => bail!("NCCL all-reduce: gradients of {other:?} are not supported"),
        };
        Ok((out, l.shape().clone()))
    }
}
