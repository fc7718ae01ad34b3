//! `convert`: CodeGen -> GPT-J / FasterTransformer / Triton. Not built yet (issue 3).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("convert is not implemented yet: see issue 3 (CodeGen -> GPT-J / FasterTransformer / Triton)")
}
