//! # hello_allreduce: the first tpcomm program to read
//!
//! **Objective**: sum a vector over all ranks of an MPI job.
//!
//! **Steps**
//! 1. Initialise MPI and build a `tpcomm::Communicator` over the world (collective).
//! 2. Every rank fills its input with `rank + 1`.
//! 3. `all_reduce_host` sums the inputs; every rank gets `1 + 2 + ... + n` in every element.
//!
//! **Usage**: `mpirun -n 4 target/release/examples/hello_allreduce`
//!
//! **Expected output** (order of lines may vary):
//! ```text
//! rank 0 of 4: every element is 10 (expected 10), algorithm host_oneshot
//! ...
//! ```

fn main() -> anyhow::Result<()> {
    let universe = mpi::initialize().ok_or_else(|| anyhow::anyhow!("MPI was already initialised"))?;
    let comm = tpcomm::Communicator::new(&universe.world(), tpcomm::Config::from_env()?)?;

    let (rank, n) = (comm.rank(), comm.size());
    let input = vec![(rank + 1) as f32; 1024];
    let mut output = vec![0.0f32; 1024];
    comm.all_reduce_host(&input, &mut output)?;

    let expected = (n * (n + 1) / 2) as f32;
    anyhow::ensure!(output.iter().all(|&x| x == expected), "rank {rank}: wrong sum");
    println!(
        "rank {rank} of {n}: every element is {} (expected {expected}), algorithm {}",
        output[0],
        comm.host_algo::<f32>(input.len())?
    );
    Ok(())
}
