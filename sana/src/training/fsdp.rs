//! FSDP-style sharding for full-weight training: the transformer's weights are
//! split into units (each block, and the rest), and each unit's fp32 master
//! weights, gradients, AdamW moments and EMA live 1/N on each of N ranks.
//! A unit's weights are all-gathered (in `param_dtype`) just before it runs
//! and freed after; its gradients are reduce-scattered (in
//! `fsdp_reduce_dtype`) into the owners' shards.
//!
//! libtorch from Rust has no module hooks, so the backward pass is driven by
//! hand, block by block in reverse: each block is recomputed from its saved
//! input with its weights gathered again, and `autograd.grad` (tch's
//! `run_backward`) gives that block's weight gradients and the gradient for
//! the block before. That is FSDP with activation checkpointing per block,
//! which is also what large SANA runs use.
//!
//! Each rank computes its slice of every global mini batch as in plain data
//! parallelism (`parallel.rs`); a rank without samples still takes part in
//! every collective (zeros), so the ranks never wait on each other's data.

use std::collections::HashMap;
use std::path::Path;

use c10d::ReduceOp;
use tch::{Device, Kind, Tensor};

use super::parallel::DataParallel;
use crate::models::transformers::{BlockContext, DiffusionTransformer, TransformerInputs};
use crate::{Result, SanaError};

fn collective(e: c10d::Error) -> SanaError {
    SanaError::Collective(e.to_string())
}

/// A group of weights sharded and gathered together.
#[derive(Debug)]
pub struct Unit {
    /// Diffusers' names of the unit's weights, in flat order.
    pub names: Vec<String>,
    /// The model's own tensors (shallow handles): gathered into, freed after.
    params: Vec<Tensor>,
    shapes: Vec<Vec<i64>>,
    /// Elements of the unit, and of one rank's shard (the unit padded to a
    /// multiple of the world size, divided by it).
    pub numel: i64,
    pub shard_len: i64,
}

/// A rank's share of a mini batch for [`Fsdp::forward_backward`]: the model
/// inputs, and the map from prediction to the scalar to differentiate.
pub type Work<'a, 'b> = (
    &'a TransformerInputs<'b>,
    &'a mut dyn FnMut(&Tensor) -> Tensor,
);

/// The sharding of one model over the ranks of a [`DataParallel`] group.
#[derive(Debug)]
pub struct Fsdp {
    /// `units[0]` is everything outside the blocks, `units[1 + i]` block `i`.
    pub units: Vec<Unit>,
    /// `train.param_dtype`: the weights' dtype while gathered (compute).
    pub compute_kind: Kind,
    /// `fsdp_reshard_after_forward`: free each block after its forward (and
    /// gather it again for the backward) instead of keeping all gathered.
    pub reshard_after_forward: bool,
    /// The master shards' dtype (the weights' own when sharded: fp32).
    pub master_kind: Kind,
    rank: usize,
    world: usize,
    device: Device,
}

/// The unit a weight belongs to: its block, or 0.
fn unit_of(name: &str) -> usize {
    name.strip_prefix("transformer_blocks.")
        .and_then(|rest| rest.split('.').next())
        .and_then(|i| i.parse::<usize>().ok())
        .map_or(0, |i| i + 1)
}

fn empty(kind: Kind, device: Device) -> Tensor {
    Tensor::empty([0], (kind, device))
}

impl Fsdp {
    /// Shards `named` (the model's full weight list, from
    /// `TrainTarget::Full.parameters`) and frees the model's copies. Returns the
    /// layout and this rank's fp32 master shard of each unit, as trainable
    /// leaves (`fsdp/unit<k>`), for the optimizer.
    pub fn shard(
        model: &dyn DiffusionTransformer,
        named: Vec<(String, Tensor)>,
        dp: &DataParallel,
        compute_kind: Kind,
        reshard_after_forward: bool,
    ) -> Result<(Self, Vec<(String, Tensor)>)> {
        let (rank, world) = (dp.rank(), dp.world_size());
        let device = model.device();
        let master_kind = named.first().map_or(Kind::Float, |(_, t)| t.kind());
        let mut grouped: Vec<Vec<(String, Tensor)>> =
            (0..=model.num_blocks()).map(|_| vec![]).collect();
        for (name, t) in named {
            let u = unit_of(&name);
            if u >= grouped.len() {
                return Err(SanaError::input(
                    "fsdp",
                    format!("weight {name} names a block the model does not have"),
                ));
            }
            grouped[u].push((name, t));
        }
        let mut units = Vec::new();
        let mut shards = Vec::new();
        for (k, group) in grouped.into_iter().enumerate() {
            let numel: i64 = group.iter().map(|(_, t)| t.numel() as i64).sum();
            let shard_len = (numel + world as i64 - 1) / world as i64;
            let shard = tch::no_grad(|| {
                let mut flat: Vec<Tensor> = group
                    .iter()
                    .map(|(_, t)| t.detach().to_kind(master_kind).flatten(0, -1))
                    .collect();
                flat.push(Tensor::zeros(
                    [shard_len * world as i64 - numel],
                    (master_kind, device),
                ));
                Tensor::cat(&flat, 0)
                    .narrow(0, rank as i64 * shard_len, shard_len)
                    .copy()
            })
            .set_requires_grad(true);
            shards.push((format!("fsdp/unit{k}"), shard));
            let unit = Unit {
                shapes: group.iter().map(|(_, t)| t.size()).collect(),
                names: group.iter().map(|(n, _)| n.clone()).collect(),
                params: group.into_iter().map(|(_, t)| t).collect(),
                numel,
                shard_len,
            };
            units.push(unit);
        }
        let fsdp = Self {
            units,
            compute_kind,
            reshard_after_forward,
            master_kind,
            rank,
            world,
            device,
        };
        for k in 0..fsdp.units.len() {
            fsdp.free(k);
        }
        Ok((fsdp, shards))
    }

    /// All-gathers unit `k`'s weights (from every rank's `shard`) into the
    /// model's tensors, as `kind`.
    pub fn gather(&self, k: usize, shard: &Tensor, dp: &DataParallel, kind: Kind) -> Result<()> {
        let unit = &self.units[k];
        tch::no_grad(|| -> Result<()> {
            let local = shard.detach().to_kind(kind);
            let mut full = Tensor::zeros([unit.shard_len * self.world as i64], (kind, self.device));
            match dp.group() {
                Some(g) => g.all_gather(&mut full, &local).map_err(collective)?,
                None => full.copy_(&local),
            }
            let mut offset = 0;
            for (p, shape) in unit.params.iter().zip(&unit.shapes) {
                let n: i64 = shape.iter().product();
                let mut p = p.shallow_clone();
                p.set_data(&full.narrow(0, offset, n).view(shape.as_slice()));
                offset += n;
            }
            Ok(())
        })
    }

    /// Frees unit `k`'s gathered weights (the shards stay).
    pub fn free(&self, k: usize) {
        for p in &self.units[k].params {
            let mut p = p.shallow_clone();
            p.set_data(&empty(self.compute_kind, self.device));
        }
    }

    /// Sums unit `k`'s weight gradients over the ranks into the owners' shards
    /// (`reduce_kind`), adding this rank's part to `shard`'s `.grad`. `grads`
    /// follow the unit's weights; an undefined one counts as zeros.
    fn reduce_scatter(
        &self,
        k: usize,
        grads: &[Tensor],
        shard: &Tensor,
        dp: &DataParallel,
        reduce_kind: Kind,
    ) -> Result<()> {
        let unit = &self.units[k];
        let part = tch::no_grad(|| -> Result<Tensor> {
            let mut flat: Vec<Tensor> = unit
                .shapes
                .iter()
                .zip(grads.iter().map(Some).chain(std::iter::repeat(None)))
                .map(|(shape, g)| match g.filter(|g| g.defined()) {
                    Some(g) => g.to_kind(reduce_kind).flatten(0, -1),
                    None => {
                        Tensor::zeros([shape.iter().product::<i64>()], (reduce_kind, self.device))
                    }
                })
                .collect();
            flat.push(Tensor::zeros(
                [unit.shard_len * self.world as i64 - unit.numel],
                (reduce_kind, self.device),
            ));
            let input = Tensor::cat(&flat, 0);
            let mut out = Tensor::zeros([unit.shard_len], (reduce_kind, self.device));
            match dp.group() {
                Some(g) => g
                    .reduce_scatter(&mut out, &input, ReduceOp::Sum)
                    .map_err(collective)?,
                None => out.copy_(&input),
            }
            Ok(out.to_kind(self.master_kind))
        })?;
        // tch cannot assign `.grad`; a linear backward adds `part` to it.
        (shard * part).sum(None).backward();
        Ok(())
    }

    /// One mini batch (this rank's slice) forward and backward, with every
    /// unit gathered only while it runs; `loss` maps the prediction to the
    /// scalar to differentiate. `work` None: this rank has no samples but
    /// takes part in every collective.
    pub fn forward_backward(
        &self,
        model: &dyn DiffusionTransformer,
        shards: &[Tensor],
        dp: &DataParallel,
        reduce_kind: Kind,
        work: Option<Work<'_, '_>>,
    ) -> Result<()> {
        let blocks = self.units.len() - 1;
        let kind = self.compute_kind;
        self.gather(0, &shards[0], dp, kind)?;
        let Some((inputs, loss_fn)) = work else {
            // Idle: the same collectives in the same order, with zero gradients.
            for i in 0..blocks {
                self.gather(1 + i, &shards[1 + i], dp, kind)?;
                if self.reshard_after_forward {
                    self.free(1 + i);
                }
            }
            for i in (0..blocks).rev() {
                if self.reshard_after_forward {
                    self.gather(1 + i, &shards[1 + i], dp, kind)?;
                }
                self.reduce_scatter(1 + i, &[], &shards[1 + i], dp, reduce_kind)?;
                self.free(1 + i);
            }
            self.reduce_scatter(0, &[], &shards[0], dp, reduce_kind)?;
            self.free(0);
            return Ok(());
        };

        // Prelude with grad (its graph is kept for the end); its outputs enter
        // the blocks as leaves whose gradients the blocks add up.
        let (hs0, ctx) = model.prelude(inputs)?;
        let leaf = |t: &Tensor| t.detach().set_requires_grad(true);
        let ctx_leaf = BlockContext {
            enc: leaf(&ctx.enc),
            encoder_bias: ctx.encoder_bias.as_ref().map(|b| b.detach()),
            temb: leaf(&ctx.temb),
            embedded_timestep: leaf(&ctx.embedded_timestep),
            b: ctx.b,
            f: ctx.f,
            h: ctx.h,
            w: ctx.w,
            // Constant tables (no weights behind them).
            rope: ctx.rope.as_ref().map(|(c, s)| (c.detach(), s.detach())),
        };
        let mut saved = Vec::with_capacity(blocks);
        let mut hs = hs0.detach();
        for i in 0..blocks {
            self.gather(1 + i, &shards[1 + i], dp, kind)?;
            saved.push(hs.shallow_clone());
            hs = tch::no_grad(|| model.block_forward(i, &hs, &ctx_leaf));
            if self.reshard_after_forward {
                self.free(1 + i);
            }
        }

        // Finale and loss: gradients for the rest's weights used there, for
        // the last hidden states and for the final norm's modulation.
        let hs_last = leaf(&hs);
        let out = model.finale(&hs_last, &ctx_leaf);
        let loss = loss_fn(&out);
        let rest = &self.units[0].params;
        let mut inputs_1: Vec<&Tensor> = rest.iter().collect();
        inputs_1.push(&hs_last);
        inputs_1.push(&ctx_leaf.embedded_timestep);
        let mut g = Tensor::run_backward(&[&loss], &inputs_1, false, false);
        let g_et = g.pop().unwrap_or_default();
        let mut g_hs = g.pop().unwrap_or_default();
        let mut rest_grads = g;
        let (mut g_enc, mut g_temb): (Option<Tensor>, Option<Tensor>) = (None, None);

        // Blocks in reverse: recompute from the saved input, take the grads.
        for i in (0..blocks).rev() {
            if self.reshard_after_forward {
                self.gather(1 + i, &shards[1 + i], dp, kind)?;
            }
            let x = leaf(&saved[i]);
            let y = model.block_forward(i, &x, &ctx_leaf);
            let root = (&y * &g_hs.to_kind(y.kind())).sum(None);
            let params = &self.units[1 + i].params;
            let mut wrt: Vec<&Tensor> = params.iter().collect();
            wrt.push(&x);
            wrt.push(&ctx_leaf.enc);
            wrt.push(&ctx_leaf.temb);
            let mut gs = Tensor::run_backward(&[&root], &wrt, false, false);
            let add = |acc: &mut Option<Tensor>, t: Tensor| {
                if t.defined() {
                    *acc = Some(match acc.take() {
                        Some(a) => a + t,
                        None => t,
                    });
                }
            };
            add(&mut g_temb, gs.pop().unwrap_or_default());
            add(&mut g_enc, gs.pop().unwrap_or_default());
            g_hs = gs.pop().unwrap_or_default();
            self.reduce_scatter(1 + i, &gs, &shards[1 + i], dp, reduce_kind)?;
            self.free(1 + i);
        }

        // Through the prelude: one backward from all four of its outputs.
        let mut terms = vec![(&hs0 * &g_hs.to_kind(hs0.kind())).sum(None)];
        for (t, g) in [
            (&ctx.enc, g_enc),
            (&ctx.temb, g_temb),
            (&ctx.embedded_timestep, Some(g_et)),
        ] {
            if let Some(g) = g.filter(|g| g.defined()) {
                terms.push((t * g.to_kind(t.kind())).sum(None).to_kind(terms[0].kind()));
            }
        }
        let root = Tensor::stack(&terms, 0).sum(None);
        let rest_refs: Vec<&Tensor> = rest.iter().collect();
        let more = Tensor::run_backward(&[&root], &rest_refs, false, false);
        for (a, b) in rest_grads.iter_mut().zip(more) {
            if !b.defined() {
                continue;
            }
            *a = if a.defined() { &*a + b } else { b };
        }
        self.reduce_scatter(0, &rest_grads, &shards[0], dp, reduce_kind)?;
        self.free(0);
        Ok(())
    }

    /// The full tensors of one per-unit state list (`shards[k]`, e.g. the
    /// master weights or a moment), by weight name: gathered on every rank.
    pub fn full_named(
        &self,
        shards: &[Tensor],
        dp: &DataParallel,
    ) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (unit, shard) in self.units.iter().zip(shards) {
            let full = tch::no_grad(|| -> Result<Tensor> {
                let mut full = Tensor::zeros(
                    [unit.shard_len * self.world as i64],
                    (self.master_kind, self.device),
                );
                match dp.group() {
                    Some(g) => g
                        .all_gather(&mut full, &shard.detach())
                        .map_err(collective)?,
                    None => full.copy_(shard),
                }
                Ok(full)
            })?;
            let mut offset = 0;
            for (name, shape) in unit.names.iter().zip(&unit.shapes) {
                let n: i64 = shape.iter().product();
                out.push((
                    name.clone(),
                    full.narrow(0, offset, n).view(shape.as_slice()),
                ));
                offset += n;
            }
        }
        Ok(out)
    }

    /// This rank's shard of each unit from full tensors by name (a checkpoint
    /// of any world size, or of an unsharded run).
    pub fn shards_of(&self, named: &HashMap<String, Tensor>, source: &Path) -> Result<Vec<Tensor>> {
        self.units
            .iter()
            .map(|unit| {
                let mut flat = Vec::new();
                for (name, shape) in unit.names.iter().zip(&unit.shapes) {
                    let t = named.get(name).ok_or_else(|| SanaError::Checkpoint {
                        path: source.to_path_buf(),
                        msg: format!("no tensor for {name}"),
                    })?;
                    if t.size() != *shape {
                        return Err(SanaError::Checkpoint {
                            path: source.to_path_buf(),
                            msg: format!("{name}: shape {:?}, the model has {shape:?}", t.size()),
                        });
                    }
                    flat.push(
                        t.to_device(self.device)
                            .to_kind(self.master_kind)
                            .flatten(0, -1),
                    );
                }
                flat.push(Tensor::zeros(
                    [unit.shard_len * self.world as i64 - unit.numel],
                    (self.master_kind, self.device),
                ));
                Ok(Tensor::cat(&flat, 0)
                    .narrow(0, self.rank as i64 * unit.shard_len, unit.shard_len)
                    .copy())
            })
            .collect()
    }

    /// Gathers every unit (master values from `shards`) into the model, runs
    /// `f` (an export), and frees them again.
    pub fn with_full_model<T>(
        &self,
        shards: &[Tensor],
        dp: &DataParallel,
        f: impl FnOnce() -> T,
    ) -> Result<T> {
        for (k, shard) in shards.iter().enumerate() {
            self.gather(k, shard, dp, self.master_kind)?;
        }
        let out = f();
        for k in 0..self.units.len() {
            self.free(k);
        }
        Ok(out)
    }

    /// Elements of the whole model, and of this rank's shards.
    pub fn numel(&self) -> (i64, i64) {
        let full = self.units.iter().map(|u| u.numel).sum();
        let shard = self.units.iter().map(|u| u.shard_len).sum();
        (full, shard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_group_by_block() {
        assert_eq!(unit_of("transformer_blocks.0.attn1.to_q.weight"), 1);
        assert_eq!(unit_of("transformer_blocks.11.ff.conv_point.weight"), 12);
        assert_eq!(unit_of("caption_projection.linear_1.weight"), 0);
        assert_eq!(unit_of("scale_shift_table"), 0);
    }
}
