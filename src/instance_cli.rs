//! `kiln instance …`: instances through a running `kiln serve`.

use clap::Subcommand;
use client::wire::{
    ActionKind, ActionRequest, BootSpec, DiskSpec, ExistingDisk, InstanceCreate, NicSpec,
};

use crate::endpoint::{size, Endpoint, Failed};
use crate::table;

/// `kiln instance …`
#[derive(Subcommand)]
pub enum InstanceCommand {
    /// List instances.
    List,
    /// Show one instance.
    Show {
        /// Name or id.
        name: String,
    },
    /// Create an instance.
    Create {
        /// Its name (a-z, 0-9, '-').
        name: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory (512MiB, 2GiB, or bytes).
        #[arg(long, default_value = "256MiB")]
        memory: String,
        /// Kernel image name.
        #[arg(long, default_value = "kiln-probe")]
        kernel: String,
        /// Initrd image name.
        #[arg(long)]
        initrd: Option<String>,
        /// Kernel command line.
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        /// Attach a disk (name; append `:ro` for read-only; repeatable, in guest order).
        #[arg(long = "disk", value_name = "DISK[:ro]")]
        disks: Vec<String>,
        /// Start it again whenever `kiln serve` starts.
        #[arg(long)]
        auto_start: bool,
        /// A NIC on this host TAP device (repeatable).
        #[arg(long = "tap", value_name = "TAP")]
        taps: Vec<String>,
        /// Start it too.
        #[arg(long)]
        start: bool,
    },
    /// Start an instance.
    Start {
        /// Name or id.
        name: String,
    },
    /// Stop an instance: ACPI power button, then a hard stop after --timeout.
    Stop {
        /// Name or id.
        name: String,
        /// Hard stop at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest before a hard stop.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Reboot an instance (--force: hard reset).
    Reboot {
        /// Name or id.
        name: String,
        /// Hard reset at once.
        #[arg(long)]
        force: bool,
    },
    /// Delete a stopped instance (--force: stop it first).
    Delete {
        /// Name or id.
        name: String,
        /// Hard-stop a running instance first.
        #[arg(long)]
        force: bool,
    },
}

/// Runs `kiln instance …`; returns the exit status.
pub fn instance(ep: Endpoint, cmd: InstanceCommand) -> i32 {
    ep.run(|ep, c| async move { run(&ep, &c, cmd).await })
}

async fn run(ep: &Endpoint, c: &client::Client, cmd: InstanceCommand) -> Result<(), Failed> {
    let action = |action, force, timeout_s| ActionRequest {
        action,
        force,
        timeout_s,
    };
    let inst = match cmd {
        InstanceCommand::List => {
            ep.show(&c.instance_list().await?, table::instances);
            return Ok(());
        }
        InstanceCommand::Show { name } => c.instance_get(&name).await?.value,
        InstanceCommand::Create {
            name,
            vcpus,
            memory,
            kernel,
            initrd,
            cmdline,
            disks,
            auto_start,
            taps,
            start,
        } => {
            let spec = InstanceCreate {
                name,
                description: String::new(),
                vcpus,
                memory: size("--memory", &memory)?,
                boot: BootSpec {
                    kernel,
                    initrd,
                    cmdline,
                },
                disks: disks
                    .iter()
                    .map(|d| {
                        let (disk, read_only) = match d.strip_suffix(":ro") {
                            Some(d) => (d, true),
                            None => (d.as_str(), false),
                        };
                        DiskSpec::Existing(ExistingDisk {
                            disk: disk.to_string(),
                            read_only,
                        })
                    })
                    .collect(),
                network_interfaces: taps
                    .into_iter()
                    .map(|host_tap| NicSpec {
                        name: None,
                        host_tap,
                        mac: None,
                    })
                    .collect(),
                auto_start,
                start,
            };
            c.instance_create(&spec).await?.value
        }
        InstanceCommand::Start { name } => {
            c.instance_action_wait(&name, &action(ActionKind::Start, false, 30))
                .await?
        }
        InstanceCommand::Stop {
            name,
            force,
            timeout,
        } => {
            c.instance_action_wait(&name, &action(ActionKind::Stop, force, timeout))
                .await?
        }
        InstanceCommand::Reboot { name, force } => {
            c.instance_action_wait(&name, &action(ActionKind::Reboot, force, 30))
                .await?
        }
        InstanceCommand::Delete { name, force } => {
            c.instance_delete(&name, force).await?;
            return Ok(());
        }
    };
    ep.show(&inst, table::instances);
    Ok(())
}
