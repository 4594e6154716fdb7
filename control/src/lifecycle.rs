//! The lifecycle of an instance as a pure transition table (API.md): which action each state
//! allows, the state it moves to at once and the one it ends in, and how what the VM reports
//! moves the state. No KVM, no locks: the callers hold the state.

use std::fmt;

/// Lifecycle states of an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Defined, not running.
    Stopped,
    /// Being built and booted.
    Starting,
    /// The guest runs.
    Running,
    /// vCPUs stopped, memory kept.
    Paused,
    /// Stopping (gracefully, then hard after a timeout).
    Stopping,
    /// Re-booting in place.
    Rebooting,
    /// The VM died; the reason says why.
    Failed,
}

impl InstanceState {
    /// Every state, in the order of API.md.
    pub const ALL: [InstanceState; 7] = [
        Self::Stopped,
        Self::Starting,
        Self::Running,
        Self::Paused,
        Self::Stopping,
        Self::Rebooting,
        Self::Failed,
    ];

    /// The state's name (`stopped`, `running`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Rebooting => "rebooting",
            Self::Failed => "failed",
        }
    }

    /// No VM: the definition may change (disks, vCPUs, memory) and the instance may go.
    pub const fn is_stopped(self) -> bool {
        matches!(self, Self::Stopped | Self::Failed)
    }

    /// A VM exists and its serial port can be talked to.
    pub const fn has_vm(self) -> bool {
        matches!(
            self,
            Self::Starting | Self::Running | Self::Paused | Self::Rebooting
        )
    }
}

impl fmt::Display for InstanceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a client asks an instance to do (API.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// stopped|failed → starting → running.
    Start,
    /// running|paused → stopping → stopped.
    Stop,
    /// running → rebooting → running.
    Reboot,
    /// A hard reset: running stays running.
    Reset,
    /// running → paused.
    Pause,
    /// paused → running.
    Resume,
}

impl Action {
    /// Every action.
    pub const ALL: [Action; 6] = [
        Self::Start,
        Self::Stop,
        Self::Reboot,
        Self::Reset,
        Self::Pause,
        Self::Resume,
    ];

    /// The action's name (`start`, `stop`, …).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Reboot => "reboot",
            Self::Reset => "reset",
            Self::Pause => "pause",
            Self::Resume => "resume",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An accepted action: the state the instance takes at once (so that a conflicting action is
/// refused while this one runs) and the one it is in when the action succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// The state from the moment the action is accepted.
    pub now: InstanceState,
    /// The state once the action has succeeded.
    pub then: InstanceState,
}

/// An action the state does not allow: what the client should do instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refused {
    /// What to do.
    pub hint: &'static str,
}

/// The transition table: what `action` does to an instance in `state`.
pub fn begin(state: InstanceState, action: Action) -> Result<Step, Refused> {
    use Action::*;
    use InstanceState::*;
    let step = |now, then| Ok(Step { now, then });
    let refused = |hint| Err(Refused { hint });
    match (action, state) {
        (Start, Stopped | Failed) => step(Starting, Running),
        (Start, _) => refused("it is already running; stop it first"),
        (Stop, Running | Paused) => step(Stopping, Stopped),
        (Stop, _) => refused("only a running or paused instance can stop"),
        (Reboot, Running) => step(Rebooting, Running),
        (Reset, Running) => step(Running, Running),
        (Reboot | Reset, _) => refused("only a running instance can reboot or reset"),
        (Pause, Running) => step(Running, Paused),
        (Pause, _) => refused("only a running instance can pause"),
        (Resume, Paused) => step(Running, Running),
        (Resume, _) => refused("only a paused instance can resume"),
    }
}

/// What a VM reports about itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmReport {
    /// A boot of the guest is running (the first, or one after a reset).
    Booted,
    /// The guest reset (or was reset) and is booted again in place.
    Resetting,
    /// The VM ended: the guest powered off or it was stopped.
    Ended,
    /// The VM failed or its thread panicked.
    Failed,
}

/// The state after the VM reported `report` in `state`. A stop in progress stays `stopping`
/// (a guest that resets instead of powering off is still being stopped), and a paused VM
/// stays paused.
pub fn after(state: InstanceState, report: VmReport) -> InstanceState {
    use InstanceState::*;
    match (report, state) {
        (VmReport::Booted, Starting | Rebooting) => Running,
        (VmReport::Resetting, Running) => Rebooting,
        (VmReport::Booted | VmReport::Resetting, s) => s,
        (VmReport::Ended, _) => Stopped,
        (VmReport::Failed, _) => Failed,
    }
}

#[cfg(test)]
mod tests {
    use super::InstanceState::*;
    use super::*;

    /// What an action does in one state: `Some((now, then))` where it is accepted, `None` where
    /// it gets `invalid_state`.
    type Outcome = Option<(InstanceState, InstanceState)>;

    /// Every state × action of API.md.
    #[rustfmt::skip]
    const TABLE: [(InstanceState, [Outcome; 6]); 7] = [
        //          start                    stop                     reboot                    reset                   pause                   resume
        (Stopped,   [Some((Starting, Running)), None,                 None,                     None,                   None,                   None]),
        (Starting,  [None,                   None,                    None,                     None,                   None,                   None]),
        (Running,   [None,                   Some((Stopping, Stopped)), Some((Rebooting, Running)), Some((Running, Running)), Some((Running, Paused)), None]),
        (Paused,    [None,                   Some((Stopping, Stopped)), None,                   None,                   None,                   Some((Running, Running))]),
        (Stopping,  [None,                   None,                    None,                     None,                   None,                   None]),
        (Rebooting, [None,                   None,                    None,                     None,                   None,                   None]),
        (Failed,    [Some((Starting, Running)), None,                 None,                     None,                   None,                   None]),
    ];

    #[test]
    fn every_state_and_action() {
        assert_eq!(
            TABLE.map(|(s, _)| s),
            InstanceState::ALL,
            "every state, once"
        );
        for (state, row) in TABLE {
            for (action, want) in Action::ALL.into_iter().zip(row) {
                let got = begin(state, action);
                match want {
                    Some((now, then)) => {
                        assert_eq!(got, Ok(Step { now, then }), "{state} × {action}")
                    }
                    None => {
                        let hint = got
                            .expect_err(&format!("{state} × {action} is refused"))
                            .hint;
                        assert!(!hint.is_empty(), "{state} × {action}: a hint");
                    }
                }
            }
        }
    }

    #[test]
    fn what_the_vm_reports() {
        use VmReport as R;
        #[rustfmt::skip]
        let table = [
            // state     booted     resetting   ended    failed
            (Stopped,   [Stopped,   Stopped,    Stopped, Failed]),
            (Starting,  [Running,   Starting,   Stopped, Failed]),
            (Running,   [Running,   Rebooting,  Stopped, Failed]),
            (Paused,    [Paused,    Paused,     Stopped, Failed]),
            (Stopping,  [Stopping,  Stopping,   Stopped, Failed]),
            (Rebooting, [Running,   Rebooting,  Stopped, Failed]),
            (Failed,    [Failed,    Failed,     Stopped, Failed]),
        ];
        assert_eq!(table.map(|(s, _)| s), InstanceState::ALL);
        for (state, row) in table {
            for (report, want) in [R::Booted, R::Resetting, R::Ended, R::Failed]
                .into_iter()
                .zip(row)
            {
                assert_eq!(after(state, report), want, "{state} after {report:?}");
            }
        }
    }

    #[test]
    fn names_are_the_serialised_ones() {
        for s in InstanceState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        let mut names: Vec<_> = Action::ALL.iter().map(|a| a.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), Action::ALL.len());
    }

    #[test]
    fn delete_and_changes_need_a_stopped_or_failed_instance() {
        // API.md: DELETE only when stopped or failed (409 otherwise); disks attach and detach,
        // vCPUs and memory change, only then too.
        #[rustfmt::skip]
        let table = [
            (Stopped, true), (Starting, false), (Running, false), (Paused, false),
            (Stopping, false), (Rebooting, false), (Failed, true),
        ];
        assert_eq!(table.map(|(s, _)| s), InstanceState::ALL);
        for (state, stopped) in table {
            assert_eq!(state.is_stopped(), stopped, "{state}");
        }
    }

    #[test]
    fn stopped_and_vm_states_split_the_states() {
        for s in InstanceState::ALL {
            let transitional = matches!(s, Stopping);
            assert_eq!(
                s.is_stopped() as u8 + s.has_vm() as u8 + transitional as u8,
                1,
                "{s}"
            );
        }
    }
}
