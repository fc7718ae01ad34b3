//! All trainable parameters as views into one flat buffer (DeepSpeed's flat 16-bit group, llm.c's
//! flat params): the layout is plain data, each tensor a leaf view that autograd fills with a
//! gradient, and the optimizer writes the whole buffer at once.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};
use zerotune_hf::{Init, ModelConfig};

/// Where one parameter lives in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slot {
    pub name: String,
    pub shape: Vec<usize>,
    pub offset: usize,
    pub numel: usize,
}

impl Slot {
    /// HF Trainer's rule (`get_decay_parameter_names`): no weight decay on biases and norms.
    pub fn decays(&self) -> bool {
        zerotune_hf::model::decays(&self.name)
    }
}

/// The flat layout: every parameter of `config` in HF module order, back to back.
pub fn layout(config: &ModelConfig) -> Vec<Slot> {
    layout_of(config.parameter_shapes())
}

/// The flat layout of these parameters, in this order, back to back.
pub fn layout_of(shapes: Vec<(String, Vec<usize>)>) -> Vec<Slot> {
    let mut offset = 0;
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let numel = shape.iter().product();
            let slot = Slot { name, shape, offset, numel };
            offset += numel;
            slot
        })
        .collect()
}

/// The flat buffer plus a leaf tensor (sharing its storage) per parameter.
pub struct ParamSet {
    pub slots: Vec<Slot>,
    /// (numel,) in the compute dtype on the compute device.
    pub flat: Tensor,
    /// One leaf view per slot, same order.
    pub tensors: Vec<Tensor>,
    by_name: HashMap<String, usize>,
}

impl ParamSet {
    /// Zero-filled parameters of `config`, `kind` on `device`, tracking gradients when `trainable`.
    pub fn zeros(config: &ModelConfig, kind: Kind, device: Device, trainable: bool) -> Self {
        Self::zeros_padded(config, kind, device, trainable, 0)
    }

    /// Like `zeros`, with the flat buffer at least `len` long (ZeRO pads it to world x partition;
    /// the padding belongs to no parameter).
    pub fn zeros_padded(config: &ModelConfig, kind: Kind, device: Device, trainable: bool, len: usize) -> Self {
        Self::zeros_laid_out(layout(config), kind, device, trainable, len)
    }

    /// Zero-filled parameters laid out by `slots` (of any architecture), the buffer at least `len`.
    pub fn zeros_laid_out(slots: Vec<Slot>, kind: Kind, device: Device, trainable: bool, len: usize) -> Self {
        let total = slots.last().map_or(0, |s| s.offset + s.numel).max(len);
        let flat = Tensor::zeros([total as i64], (kind, device));
        let tensors = slots
            .iter()
            .map(|s| {
                let shape: Vec<i64> = s.shape.iter().map(|&d| d as i64).collect();
                flat.narrow(0, s.offset as i64, s.numel as i64).view(shape.as_slice()).detach().set_requires_grad(trainable)
            })
            .collect();
        let by_name = slots.iter().enumerate().map(|(i, s)| (s.name.clone(), i)).collect();
        Self { slots, flat, tensors, by_name }
    }

    pub fn numel(&self) -> usize {
        self.slots.last().map_or(0, |s| s.offset + s.numel)
    }

    /// The parameter called `name` (a handle sharing storage).
    pub fn get(&self, name: &str) -> Tensor {
        self.find(name).unwrap_or_else(|| panic!("no parameter {name} in the layout"))
    }

    /// The parameter called `name`, if the layout has one (an optional bias, say).
    pub fn find(&self, name: &str) -> Option<Tensor> {
        self.by_name.get(name).map(|&i| self.tensors[i].shallow_clone())
    }

    /// Sets every gradient to zero (keeps the buffers).
    pub fn zero_grads(&mut self) {
        for t in &mut self.tensors {
            t.zero_grad();
        }
    }

    /// HF `_init_weights`: Linear and Embedding weights ~ N(0, range), biases 0, norms (1, 0), and
    /// the padding row of the embedding 0.
    pub fn init_like_hf(&mut self, config: &ModelConfig, seed: u64) {
        tch::manual_seed(seed as i64);
        let _guard = tch::no_grad_guard();
        for (slot, tensor) in self.slots.iter().zip(self.tensors.iter_mut()) {
            let n = slot.numel as i64;
            let values = match config.init_of(&slot.name) {
                Init::Ones => Tensor::ones([n], (Kind::Float, Device::Cpu)),
                Init::Zeros => Tensor::zeros([n], (Kind::Float, Device::Cpu)),
                Init::Normal(std) => Tensor::randn([n], (Kind::Float, Device::Cpu)) * std,
            };
            tensor.view(-1).copy_(&values);
        }
        if let Some((name, pad)) = config.padding_row() {
            if let Some(embedding) = self.find(name).filter(|e| (0..e.size()[0]).contains(&pad)) {
                let _ = embedding.get(pad).zero_();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_dense_and_views_share_the_buffer() {
        let config = ModelConfig::builtin("tiny").unwrap();
        let slots = layout(&config);
        for pair in slots.windows(2) {
            assert_eq!(pair[0].offset + pair[0].numel, pair[1].offset);
        }
        let params = ParamSet::zeros(&config, Kind::Float, Device::Cpu, true);
        assert_eq!(params.numel(), config.num_parameters());
        let _guard = tch::no_grad_guard();
        let _ = params.flat.narrow(0, slots[1].offset as i64, 1).fill_(3.0);
        assert_eq!(params.get("transformer.h.0.ln_1.weight").double_value(&[0]), 3.0);
        assert!(!slots[1].decays() && slots[0].decays());
    }
}
