//! The `scoreguide` command.

use clap::{Parser, Subcommand};
use scoreguide::train::Checkpoint;
use std::path::PathBuf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "scoreguide",
    version,
    about = "Score-based generative modelling with guidance"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a checkpoint's self-describing metadata and its tensors.
    Info {
        /// A scoreguide checkpoint (.safetensors).
        checkpoint: PathBuf,
    },
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info { checkpoint } => info(&checkpoint),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn info(path: &std::path::Path) -> candle_core::Result<()> {
    let c = Checkpoint::load(path)?;
    println!("{}", path.display());
    for (k, v) in &c.metadata {
        println!("  {k}: {v}");
    }
    // Sections are the name's first part, or first two for `adam.m`, `adam.v`,
    // `classifier.K` (see docs/ARCHITECTURE.md, "Checkpoints").
    let mut sections: std::collections::BTreeMap<String, (usize, usize)> = Default::default();
    for (name, t) in &c.tensors {
        let parts: Vec<&str> = name.split('.').collect();
        let depth = if matches!(parts[0], "adam" | "classifier") {
            2
        } else {
            1
        };
        let e = sections
            .entry(parts[..depth.min(parts.len())].join("."))
            .or_default();
        e.0 += 1;
        e.1 += t.elem_count();
    }
    for (s, (n, p)) in sections {
        println!("  tensors {s}.*: {n} tensors, {p} values");
    }
    Ok(())
}
