//! `kiln operation …`: the server's operations (long actions: start, stop, …).

use clap::Subcommand;
use uuid::Uuid;

use crate::endpoint::{Endpoint, Failed};
use crate::table;

/// `kiln operation …`
#[derive(Subcommand)]
pub enum OperationCommand {
    /// List the recent operations, oldest first.
    #[command(visible_alias = "ls")]
    List {
        /// Only those on this instance (name or id).
        #[arg(long)]
        instance: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Show operations.
    Show {
        /// Operation ids.
        #[arg(required = true)]
        ids: Vec<Uuid>,
    },
    /// Wait until operations have ended (at most --timeout seconds); fails when one failed.
    Wait {
        /// Operation ids.
        #[arg(required = true)]
        ids: Vec<Uuid>,
        /// Seconds to wait at most.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
}

/// Runs `kiln operation …`; returns the exit status.
pub fn operation(ep: Endpoint, cmd: OperationCommand) -> i32 {
    ep.run(|ep, c| async move { run(&ep, &c, cmd).await })
}

async fn run(ep: &Endpoint, c: &client::Client, cmd: OperationCommand) -> Result<(), Failed> {
    match cmd {
        OperationCommand::List { instance, limit } => {
            let ops = c.operation_list_of(instance.as_deref(), limit).await?;
            ep.show(&ops, table::operations);
        }
        OperationCommand::Show { ids } => {
            let mut ops = Vec::new();
            for id in ids {
                ops.push(c.operation_get(id).await?);
            }
            ep.show(&ops, table::operations);
        }
        OperationCommand::Wait { ids, timeout } => {
            let pb = crate::progress::spinner(format!("waiting for {} operation(s)", ids.len()));
            let end = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
            let mut ops = Vec::new();
            for id in ids {
                let mut op = c.operation_get(id).await?;
                while !crate::progress::is_done(op.state) && std::time::Instant::now() < end {
                    op = c.operation_wait(id, 1).await?;
                }
                ops.push(op);
            }
            pb.finish_and_clear();
            ep.show(&ops, table::operations);
            let failed: Vec<String> = ops
                .iter()
                .filter(|o| o.state != client::wire::OperationState::Succeeded)
                .map(|o| match &o.error {
                    Some(e) => format!("operation {}: {e}", o.id),
                    None => format!("operation {} is {:?}", o.id, o.state).to_lowercase(),
                })
                .collect();
            return crate::instance_cli::fail_if(failed);
        }
    }
    Ok(())
}
