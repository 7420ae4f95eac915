//! Registers and local memory (stack frame, spills) of every kernel entry, as ptxas reports them
//! through NVRTC: no GPU needed. A run-time index into a row of pointers, or a register budget
//! too small for an entry, shows as stack or spills here before it shows in a benchmark.
//!
//! ```sh
//! cargo run --release --example kernel_resources -- [--arch 90] [--family custom_allreduce] [--world 2,4,8] [--spills]
//! ```
//!
//! Families: `custom_allreduce`, `packet_allreduce`, `quick_allreduce`, `rms_norm`; worlds 1-8
//! (default all); `--spills` prints only entries with local memory. NVRTC comes from the
//! `nvidia-cuda-nvrtc` wheel (mpirun-scripts/setup.sh; put its `lib` on `LD_LIBRARY_PATH`).

#[cfg(feature = "rocm")]
fn main() {
    eprintln!("kernel_resources reads NVRTC's ptxas report: build without the rocm feature");
    std::process::exit(2);
}

#[cfg(not(feature = "rocm"))]
fn main() -> anyhow::Result<()> {
    use anyhow::{anyhow, Context};
    let mut arch = (9, 0);
    let mut family = None;
    let mut worlds: Vec<usize> = (1..=8).collect();
    let mut spills_only = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or_else(|| anyhow!("{a} needs a value"));
        match a.as_str() {
            "--arch" => {
                let v: i32 = value()?.parse().context("--arch: e.g. 90")?;
                arch = (v / 10, v % 10);
            }
            "--family" => family = Some(value()?),
            "--world" => {
                worlds =
                    value()?.split(',').map(|w| w.parse()).collect::<Result<_, _>>().context("--world: e.g. 2,4,8")?
            }
            "--spills" => spills_only = true,
            "-h" | "--help" => {
                println!("kernel_resources [--arch 90] [--family NAME] [--world 2,4,8] [--spills]");
                return Ok(());
            }
            other => return Err(anyhow!("unknown argument {other}; see --help")),
        }
    }
    if !tpcomm::testing::nvrtc_present() {
        return Err(anyhow!(
            "no NVRTC library found: run mpirun-scripts/setup.sh and put the wheel's lib on LD_LIBRARY_PATH"
        ));
    }
    let rows = tpcomm::testing::kernel_resources(arch, family.as_deref(), &worlds)?;
    println!(
        "# sm_{}{}: {:<18} {:>5} {:<28} {:>9} {:>6} {:>13} {:>12}",
        arch.0, arch.1, "family", "world", "entry", "registers", "stack", "spill stores", "spill loads"
    );
    let mut with_local = 0;
    for k in &rows {
        let local = k.stack_bytes + k.spill_stores + k.spill_loads > 0;
        with_local += usize::from(local);
        if spills_only && !local {
            continue;
        }
        println!(
            "        {:<18} {:>5} {:<28} {:>9} {:>6} {:>13} {:>12}",
            k.family, k.world, k.entry, k.registers, k.stack_bytes, k.spill_stores, k.spill_loads
        );
    }
    println!("# {} entries, {with_local} with local memory", rows.len());
    Ok(())
}
