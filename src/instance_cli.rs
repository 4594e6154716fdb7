//! `kiln instance …`: instances through a running `kiln serve`. The actions take several
//! names (`kiln instance stop a b`): they all start at once, then the command waits for
//! them with a spinner and prints the instances as they ended up.

use clap::Subcommand;
use client::wire::{
    ActionKind, ActionRequest, BootPatch, BootSpec, DiskSpec, ExistingDisk, Instance,
    InstanceCreate, InstancePatch, NicSpec, Operation, OperationState,
};

use crate::endpoint::{size, Endpoint, Failed};
use crate::{progress, table};

/// `kiln instance …`
#[derive(Subcommand)]
pub enum InstanceCommand {
    /// List instances.
    #[command(visible_alias = "ls")]
    List,
    /// Show instances in detail (state and why, boot settings, disks, NICs).
    Show {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Create an instance.
    Create {
        /// Its name (a-z, 0-9, '-').
        name: String,
        /// vCPUs (at most the host's CPUs).
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory: 256M, 1G, 512MiB; a bare number is MiB.
        #[arg(long, default_value = "256M")]
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
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Attach a disk (name; append `:ro` for read-only; repeatable, in guest order).
        #[arg(long = "disk", value_name = "DISK[:ro]")]
        disks: Vec<String>,
        /// Start it again whenever `kiln serve` starts.
        #[arg(long)]
        auto_start: bool,
        /// A NIC on this host TAP device (repeatable).
        #[arg(long = "tap", value_name = "TAP")]
        taps: Vec<String>,
        /// Start it too (and wait until it runs).
        #[arg(long)]
        start: bool,
    },
    /// Change an instance: vCPUs, memory and boot settings (while it is stopped), name,
    /// description, auto-start.
    #[command(visible_alias = "resize")]
    Set {
        /// Name or id.
        name: String,
        /// vCPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory: 256M, 1G, 512MiB; a bare number is MiB.
        #[arg(long)]
        memory: Option<String>,
        /// Kernel command line.
        #[arg(long)]
        cmdline: Option<String>,
        /// Kernel image name.
        #[arg(long)]
        kernel: Option<String>,
        /// Initrd image name ("" for none).
        #[arg(long)]
        initrd: Option<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// Start it whenever `kiln serve` starts.
        #[arg(long, value_name = "BOOL")]
        auto_start: Option<bool>,
        /// A new name.
        #[arg(long = "rename", value_name = "NEW_NAME")]
        rename: Option<String>,
    },
    /// Start instances and wait until they run.
    Start {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Stop instances: the ACPI power button, then a forced stop after --timeout (said so).
    Stop {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
        /// Force a stop at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest to power off before a forced stop.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Reboot instances (the guest shuts down and boots again; --force: hard reset).
    Reboot {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
        /// Hard reset at once.
        #[arg(long)]
        force: bool,
    },
    /// Hard-reset instances (as the reset button).
    Reset {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Pause instances (vCPUs stop, memory is kept).
    Pause {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Resume paused instances.
    Resume {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete stopped instances (--force: stop them first). Their disks stay.
    #[command(visible_alias = "rm")]
    Delete {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
        /// Force-stop a running instance first.
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
    match cmd {
        InstanceCommand::List => {
            ep.show(&c.instance_list().await?, table::instances);
            Ok(())
        }
        InstanceCommand::Show { names } => {
            let mut shown = Vec::new();
            let mut failed = Vec::new();
            for n in &names {
                match c.instance_get(n).await {
                    Ok(t) => shown.push(t.value),
                    Err(e) => failed.push(named(n, e)?),
                }
            }
            if ep.json {
                show_json(&shown);
            } else {
                for (i, inst) in shown.iter().enumerate() {
                    if i > 0 {
                        crate::endpoint::out("\n");
                    }
                    table::instance_detail(inst);
                }
            }
            fail_if(failed)
        }
        InstanceCommand::Create {
            name,
            vcpus,
            memory,
            kernel,
            initrd,
            cmdline,
            description,
            disks,
            auto_start,
            taps,
            start,
        } => {
            let spec = InstanceCreate {
                name,
                description,
                vcpus,
                memory: size("--memory", &memory)?,
                boot: BootSpec {
                    kernel,
                    initrd,
                    cmdline,
                },
                disks: disks.iter().map(|d| disk_spec(d)).collect(),
                network_interfaces: taps
                    .into_iter()
                    .map(|host_tap| NicSpec {
                        name: None,
                        host_tap,
                        mac: None,
                    })
                    .collect(),
                auto_start,
                start: false,
            };
            let inst = c.instance_create(&spec).await?.value;
            if start {
                let name = inst.name.clone();
                return act(ep, c, &[name], action(ActionKind::Start, false, 30)).await;
            }
            ep.show(&inst, table::instances);
            Ok(())
        }
        InstanceCommand::Set {
            name,
            vcpus,
            memory,
            cmdline,
            kernel,
            initrd,
            description,
            auto_start,
            rename,
        } => {
            let boot =
                (kernel.is_some() || initrd.is_some() || cmdline.is_some()).then_some(BootPatch {
                    kernel,
                    initrd,
                    cmdline,
                });
            let patch = InstancePatch {
                name: rename,
                description,
                vcpus,
                memory: memory.map(|m| size("--memory", &m)).transpose()?,
                auto_start,
                boot,
            };
            if patch == InstancePatch::default() {
                return Err(Failed::Usage(
                    "nothing to change: give --vcpus, --memory, --cmdline, --kernel, --initrd, \
                     --description, --auto-start or --rename"
                        .into(),
                ));
            }
            let inst = c.instance_update(&name, &patch, None).await?.value;
            ep.show(&inst, table::instances);
            Ok(())
        }
        InstanceCommand::Start { names } => {
            act(ep, c, &names, action(ActionKind::Start, false, 30)).await
        }
        InstanceCommand::Stop {
            names,
            force,
            timeout,
        } => act(ep, c, &names, action(ActionKind::Stop, force, timeout)).await,
        InstanceCommand::Reboot { names, force } => {
            act(ep, c, &names, action(ActionKind::Reboot, force, 30)).await
        }
        InstanceCommand::Reset { names } => {
            act(ep, c, &names, action(ActionKind::Reset, false, 30)).await
        }
        InstanceCommand::Pause { names } => {
            act(ep, c, &names, action(ActionKind::Pause, false, 30)).await
        }
        InstanceCommand::Resume { names } => {
            act(ep, c, &names, action(ActionKind::Resume, false, 30)).await
        }
        InstanceCommand::Delete { names, force } => {
            let mut failed = Vec::new();
            for n in &names {
                if let Err(e) = c.instance_delete(n, force).await {
                    failed.push(named(n, e)?);
                }
            }
            fail_if(failed)
        }
    }
}

/// `DISK[:ro]` of `--disk`.
fn disk_spec(d: &str) -> DiskSpec {
    let (disk, read_only) = match d.strip_suffix(":ro") {
        Some(d) => (d, true),
        None => (d, false),
    };
    DiskSpec::Existing(ExistingDisk {
        disk: disk.to_string(),
        read_only,
    })
}

/// What the spinner says while an action runs.
fn waiting_for(req: &ActionRequest) -> String {
    match req.action {
        ActionKind::Start => "starting".into(),
        ActionKind::Stop if req.force => "stopping (forced)".into(),
        ActionKind::Stop => format!(
            "stopping: waiting up to {} s for the guest to power off, then forcing",
            req.timeout_s
        ),
        ActionKind::Reboot => "rebooting".into(),
        ActionKind::Reset => "resetting".into(),
        ActionKind::Pause => "pausing".into(),
        ActionKind::Resume => "resuming".into(),
    }
}

/// Runs `req` on every instance of `names` at once, waits for them all, prints what became of
/// them (a note on stderr for one whose action says more, such as a forced stop); fails
/// naming each instance whose action was refused or failed.
async fn act(
    ep: &Endpoint,
    c: &client::Client,
    names: &[String],
    req: ActionRequest,
) -> Result<(), Failed> {
    let mut failed = Vec::new();
    let mut ops: Vec<(String, Operation)> = Vec::new();
    for n in names {
        match c.instance_action(n, &req).await {
            Ok(op) => ops.push((n.clone(), op)),
            Err(e) => failed.push(named(n, e)?),
        }
    }
    let done = progress::wait_all(c, ops, &waiting_for(&req)).await?;
    let mut shown: Vec<Instance> = Vec::new();
    for (n, op) in done {
        if op.state != OperationState::Succeeded {
            let why = op.error.unwrap_or_else(|| format!("{:?}", op.state));
            failed.push(format!("{n}: {why}"));
            continue;
        }
        if let Some(detail) = &op.detail {
            eprintln!("{n}: {detail}");
        }
        match c.instance_get(&n).await {
            Ok(t) => shown.push(t.value),
            Err(e) => failed.push(named(&n, e)?),
        }
    }
    if !shown.is_empty() {
        ep.show(&shown, table::instances);
    }
    fail_if(failed)
}

/// The failure of a call on one of several instances, named; a server that cannot be
/// reached fails the whole command at once.
pub fn named(name: &str, e: client::Error) -> Result<String, Failed> {
    match e {
        e @ client::Error::Connect { .. } => Err(Failed::Call(e)),
        e => Ok(format!("{name}: {e}")),
    }
}

/// `--json` of several items: one value for one, an array for more.
fn show_json(items: &[Instance]) {
    let v = match items {
        [one] => serde_json::to_value(one),
        many => serde_json::to_value(many),
    };
    crate::endpoint::print_json(&v.unwrap_or_default());
}

/// Fails with one line per failure (the first is printed by the caller as `kiln: …`).
pub fn fail_if(failed: Vec<String>) -> Result<(), Failed> {
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Failed::Usage(failed.join("\nkiln: ")))
    }
}
