//! The alert state machine: pure, no I/O, driven by events, rejected records and clock ticks.
//!
//! Per rule and device an alert is `ok`, `pending` (the condition holds, not yet for the rule's
//! `for`) or `firing`. It fires once when the condition has held for `for`, and resolves once when
//! it has been false for `clear_for` (by default as long as `for`), so a value hovering at the
//! threshold neither fires nor resolves on every reading. Threshold rules run on device time;
//! silence and DLQ rates on arrival time against the clock.
//!
//! Every alert's id is `rule:device:start` (start: when its condition began to hold, in ms), the
//! same however often the input is read again: consumers and webhook receivers deduplicate on
//! `(alert_id, status)`.
//!
//! A device that sends nothing (no event, no rejected record) for longer than the forget window
//! ([`Engine::forgetting_after`]) is forgotten: its states are dropped, and its firing alerts
//! resolve first, marked [`Transition::forgotten`]. So fake device ids cannot grow the state
//! without bound.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use serde::{Deserialize, Serialize};
use telemetry_core::Event;

use crate::rules::{Condition, Rule};

/// Where one rule stands for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// The condition does not hold.
    Ok,
    /// The condition holds since `since`, not yet for the rule's `for`.
    Pending {
        /// When it began to hold (ms).
        since: i64,
    },
    /// The alert fired.
    Firing {
        /// When the condition began to hold (ms): part of the alert's id.
        since: i64,
        /// When it fired (ms).
        fired_at: i64,
        /// When the condition stopped holding, while it has not held since (ms).
        clear_since: Option<i64>,
    },
}

/// What a rule remembers about a device besides its phase.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// Silence rules: arrival time of the device's latest event (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<i64>,
    /// DLQ-rate rules: arrival times of the latest rejected records, newest last; only as many
    /// as the rule's limit plus one (all it takes to tell whether the limit is passed).
    #[serde(default, skip_serializing_if = "VecDeque::is_empty")]
    pub rejections: VecDeque<i64>,
    /// Threshold rules, while pending or firing: arrival time of the device's latest event with
    /// the metric (ms), so that a restarted alerter knows how long the device has been silent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_arrival: Option<i64>,
}

/// One rule's state for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// The phase.
    #[serde(flatten)]
    pub phase: Phase,
    /// The latest value that made the condition hold (threshold rules), or the count (DLQ).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// What the rule remembers.
    #[serde(default)]
    pub memory: Memory,
}

impl Default for State {
    fn default() -> Self {
        State {
            phase: Phase::Ok,
            value: None,
            memory: Memory::default(),
        }
    }
}

impl State {
    /// Whether the state says nothing worth keeping.
    pub fn is_empty(&self) -> bool {
        self.phase == Phase::Ok && self.memory == Memory::default()
    }

    /// The arrival time (ms) of the latest event or rejected record this state remembers.
    fn last_arrival(&self) -> Option<i64> {
        [
            self.memory.last_seen,
            self.memory.rejections.back().copied(),
            self.memory.last_arrival,
        ]
        .into_iter()
        .flatten()
        .max()
    }
}

/// Fired or resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The alert fired.
    Firing,
    /// The alert resolved.
    Resolved,
}

impl Status {
    /// `firing` or `resolved`.
    pub fn name(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

/// An alert firing or resolving.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// `rule:device:start`.
    pub alert_id: String,
    /// The rule's index in the rules.
    pub rule: usize,
    /// The device.
    pub device_id: String,
    /// Fired or resolved.
    pub status: Status,
    /// When the condition began to hold (ms).
    pub started_at: i64,
    /// When the alert fired (ms).
    pub fired_at: i64,
    /// When it resolved (ms), for [`Status::Resolved`].
    pub resolved_at: Option<i64>,
    /// The value that made the condition hold, if the rule has one.
    pub value: Option<f64>,
    /// Resolved because the device sent nothing for longer than the forget window and its
    /// states were dropped, not because the condition stopped holding.
    pub forgotten: bool,
}

/// (rule index, device) → state.
pub type Key = (usize, String);

/// What [`Engine::forget`] dropped.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Forgotten {
    /// Devices forgotten.
    pub devices: usize,
    /// Their states dropped (each deleted from the store by [`Engine::take_changes`]).
    pub states: usize,
    /// Their alerts that were firing, resolved.
    pub transitions: Vec<Transition>,
}

/// The states of every rule and device, with the keys changed since [`Engine::take_changes`].
pub struct Engine {
    rules: Vec<Rule>,
    states: BTreeMap<Key, State>,
    changed: BTreeSet<Key>,
    /// Every device heard from within the forget window: arrival time (ms) of its latest event
    /// or rejected record.
    last_active: HashMap<String, i64>,
    /// Devices with restored states that remember no arrival time (stored by an alerter before
    /// the forget window existed): their window starts at the first [`Engine::forget`].
    unstamped: BTreeSet<String>,
    /// How long a device may send nothing before it is forgotten (ms); `None`: never.
    forget_after: Option<i64>,
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Engine {
    /// An engine for `rules` with the states `restored` (from the database; keys of rules that
    /// are no longer in the file are dropped).
    pub fn new(rules: Vec<Rule>, restored: impl IntoIterator<Item = (Key, State)>) -> Self {
        let count = rules.len();
        let states: BTreeMap<Key, State> = restored
            .into_iter()
            .filter(|((rule, _), _)| *rule < count)
            .collect();
        let mut last_active: HashMap<String, i64> = HashMap::new();
        for ((_, device_id), state) in &states {
            if let Some(arrival) = state.last_arrival() {
                let latest = last_active.entry(device_id.clone()).or_insert(arrival);
                *latest = (*latest).max(arrival);
            }
        }
        let unstamped = states
            .keys()
            .map(|(_, device_id)| device_id)
            .filter(|device_id| !last_active.contains_key(*device_id))
            .cloned()
            .collect();
        Engine {
            rules,
            states,
            changed: BTreeSet::new(),
            last_active,
            unstamped,
            forget_after: None,
        }
    }

    /// Forget devices that send nothing (no event, no rejected record) for longer than `window`;
    /// by default the engine never forgets.
    #[must_use]
    pub fn forgetting_after(mut self, window: std::time::Duration) -> Self {
        self.forget_after = Some(millis(window));
        self
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// How many states the engine holds.
    pub fn states_held(&self) -> usize {
        self.states.len()
    }

    /// How many devices the engine tracks (heard from within the forget window, or with a state).
    pub fn devices_tracked(&self) -> usize {
        self.last_active.len() + self.unstamped.len()
    }

    /// Notes that `device_id` was heard from at `arrival` (ms).
    fn heard_from(&mut self, device_id: &str, arrival: i64) {
        if let Some(latest) = self.last_active.get_mut(device_id) {
            *latest = (*latest).max(arrival);
        } else {
            self.unstamped.remove(device_id);
            self.last_active.insert(device_id.to_string(), arrival);
        }
    }

    /// The states changed since the last call: `(key, Some(state))` to store, `(key, None)` to
    /// delete.
    pub fn take_changes(&mut self) -> Vec<(Key, Option<State>)> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|key| {
                let state = self
                    .states
                    .get(&key)
                    .filter(|state| !state.is_empty())
                    .cloned();
                (key, state)
            })
            .collect()
    }

    /// An accepted event, which arrived at `arrival` (ms).
    pub fn event(&mut self, event: &Event, arrival: i64) -> Vec<Transition> {
        self.heard_from(&event.device_id, arrival);
        let mut transitions = Vec::new();
        for index in 0..self.rules.len() {
            let key = (index, event.device_id.clone());
            let transition = match &self.rules[index].condition {
                Condition::Threshold {
                    metric,
                    comparison,
                    threshold,
                } => {
                    let Some(value) = event.metrics.get(metric) else {
                        continue;
                    };
                    let holds = comparison.holds(value, *threshold);
                    let transition =
                        self.step(key.clone(), holds, event.device_ts, holds.then_some(value));
                    self.note_arrival(&key, arrival);
                    transition
                }
                Condition::Silent(_) => {
                    let state = self.states.entry(key.clone()).or_default();
                    let previous = state.memory.last_seen;
                    state.memory.last_seen =
                        Some(previous.map_or(arrival, |seen| seen.max(arrival)));
                    self.changed.insert(key.clone());
                    if previous.is_some_and(|seen| arrival < seen) {
                        // Older than one already seen: it says nothing about the silence now.
                        continue;
                    }
                    self.step(key, false, arrival, None)
                }
                Condition::DlqRate { .. } => continue,
            };
            transitions.extend(transition);
        }
        transitions
    }

    /// A rejected record from `device_id`, which arrived at `arrival` (ms).
    pub fn rejection(&mut self, device_id: &str, arrival: i64) -> Vec<Transition> {
        self.heard_from(device_id, arrival);
        let mut transitions = Vec::new();
        for index in 0..self.rules.len() {
            let Condition::DlqRate { above, window } = self.rules[index].condition else {
                continue;
            };
            let key = (index, device_id.to_string());
            let state = self.states.entry(key.clone()).or_default();
            let times = &mut state.memory.rejections;
            // Kept sorted: records of one device arrive in order, but allow for a straggler.
            let at = times.partition_point(|time| *time <= arrival);
            times.insert(at, arrival);
            while times.len()
                > usize::try_from(above)
                    .unwrap_or(usize::MAX)
                    .saturating_add(1)
            {
                times.pop_front();
            }
            self.changed.insert(key.clone());
            let now = times.back().copied().unwrap_or(arrival);
            let (holds, count) = Self::over_limit(times, above, millis(window), now);
            transitions.extend(self.step(key, holds, now, holds.then_some(count)));
        }
        transitions
    }

    /// The clock moved to `now` (ms): silences and DLQ rates are judged again, but only when
    /// `caught_up` (the input is at the end of its topics): while the consumer catches up, its
    /// input is behind the clock, every device would look silent and every burst over.
    pub fn tick(&mut self, now: i64, caught_up: bool) -> Vec<Transition> {
        let mut transitions = Vec::new();
        if !caught_up {
            return transitions;
        }
        let keys: Vec<Key> = self.states.keys().cloned().collect();
        for key in keys {
            let Some(rule) = self.rules.get(key.0) else {
                continue;
            };
            let Some(state) = self.states.get(&key) else {
                continue;
            };
            let transition = match rule.condition {
                Condition::Silent(after) => {
                    let Some(last_seen) = state.memory.last_seen else {
                        continue;
                    };
                    let silent_since = last_seen.saturating_add(millis(after));
                    if now < silent_since {
                        continue;
                    }
                    // The silence began `after` past the last event: the same id however late
                    // the tick comes.
                    self.step(key, true, silent_since, None)
                }
                Condition::DlqRate { above, window } => {
                    if state.phase == Phase::Ok {
                        continue;
                    }
                    let (holds, count) =
                        Self::over_limit(&state.memory.rejections, above, millis(window), now);
                    self.step(key, holds, now, holds.then_some(count))
                }
                Condition::Threshold { .. } => continue,
            };
            transitions.extend(transition);
        }
        transitions
    }

    /// Keeps a pending or firing threshold state's `last_arrival`, for a restart to know how
    /// long the device has been silent. (An ok state has none: [`Engine::step`] clears it.)
    fn note_arrival(&mut self, key: &Key, arrival: i64) {
        let Some(state) = self.states.get_mut(key) else {
            return;
        };
        if state.phase == Phase::Ok {
            return;
        }
        let latest = state
            .memory
            .last_arrival
            .map_or(arrival, |at| at.max(arrival));
        if state.memory.last_arrival != Some(latest) {
            state.memory.last_arrival = Some(latest);
            self.changed.insert(key.clone());
        }
    }

    /// The clock moved to `now` (ms): devices heard from last more than the forget window ago
    /// are forgotten, their firing alerts resolved first ([`Transition::forgotten`]). Only when
    /// `caught_up`, as [`Engine::tick`]: a consumer catching up would forget devices whose
    /// records it has not read yet.
    pub fn forget(&mut self, now: i64, caught_up: bool) -> Forgotten {
        let mut forgotten = Forgotten::default();
        let Some(window) = self.forget_after else {
            return forgotten;
        };
        if !caught_up {
            return forgotten;
        }
        for device_id in std::mem::take(&mut self.unstamped) {
            self.last_active.insert(device_id, now);
        }
        let cutoff = now.saturating_sub(window);
        let silent: Vec<String> = self
            .last_active
            .iter()
            .filter(|(_, last)| **last < cutoff)
            .map(|(device_id, _)| device_id.clone())
            .collect();
        for device_id in silent {
            self.last_active.remove(&device_id);
            forgotten.devices += 1;
            for (index, rule) in self.rules.iter().enumerate() {
                let key = (index, device_id.clone());
                let Some(state) = self.states.remove(&key) else {
                    continue;
                };
                forgotten.states += 1;
                if let Phase::Firing {
                    since, fired_at, ..
                } = state.phase
                {
                    forgotten.transitions.push(Transition {
                        alert_id: format!("{}:{device_id}:{since}", rule.name),
                        rule: index,
                        device_id: device_id.clone(),
                        status: Status::Resolved,
                        started_at: since,
                        fired_at,
                        resolved_at: Some(now),
                        value: state.value,
                        forgotten: true,
                    });
                }
                self.changed.insert(key);
            }
        }
        forgotten
    }

    /// Whether more than `above` of `times` are within `window` before `now`, and how many.
    fn over_limit(times: &VecDeque<i64>, above: u32, window: i64, now: i64) -> (bool, f64) {
        let recent = times
            .iter()
            .filter(|time| **time > now.saturating_sub(window) && **time <= now)
            .count();
        #[allow(clippy::cast_precision_loss)]
        (
            recent > usize::try_from(above).unwrap_or(usize::MAX),
            recent as f64,
        )
    }

    /// Moves one state on: the condition `holds` (or not) at `at`.
    fn step(&mut self, key: Key, holds: bool, at: i64, value: Option<f64>) -> Option<Transition> {
        let rule = self.rules.get(key.0)?;
        let (hold, clear_for) = (millis(rule.hold), millis(rule.clear_for));
        let state = self.states.entry(key.clone()).or_default();
        let before = state.clone();
        let mut transition = None;
        let alert_id = |since: i64| format!("{}:{}:{since}", rule.name, key.1);
        match (state.phase.clone(), holds) {
            (Phase::Ok, false) => {}
            (Phase::Ok, true) | (Phase::Pending { .. }, true) => {
                let since = match state.phase {
                    Phase::Pending { since } => since.min(at),
                    _ => at,
                };
                state.value = value;
                if at.saturating_sub(since) >= hold {
                    state.phase = Phase::Firing {
                        since,
                        fired_at: at,
                        clear_since: None,
                    };
                    transition = Some(Transition {
                        alert_id: alert_id(since),
                        rule: key.0,
                        device_id: key.1.clone(),
                        status: Status::Firing,
                        started_at: since,
                        fired_at: at,
                        resolved_at: None,
                        value,
                        forgotten: false,
                    });
                } else {
                    state.phase = Phase::Pending { since };
                }
            }
            (Phase::Pending { .. }, false) => {
                state.phase = Phase::Ok;
                state.value = None;
                state.memory.last_arrival = None;
            }
            (
                Phase::Firing {
                    since, fired_at, ..
                },
                true,
            ) => {
                state.phase = Phase::Firing {
                    since,
                    fired_at,
                    clear_since: None,
                };
                state.value = value.or(state.value);
            }
            (
                Phase::Firing {
                    since,
                    fired_at,
                    clear_since,
                },
                false,
            ) => {
                let clear_since = clear_since.map_or(at, |clear| clear.min(at));
                if at.saturating_sub(clear_since) >= clear_for {
                    transition = Some(Transition {
                        alert_id: alert_id(since),
                        rule: key.0,
                        device_id: key.1.clone(),
                        status: Status::Resolved,
                        started_at: since,
                        fired_at,
                        resolved_at: Some(at),
                        value: state.value,
                        forgotten: false,
                    });
                    state.phase = Phase::Ok;
                    state.value = None;
                    state.memory.last_arrival = None;
                } else {
                    state.phase = Phase::Firing {
                        since,
                        fired_at,
                        clear_since: Some(clear_since),
                    };
                }
            }
        }
        let (changed, empty) = (*state != before, state.is_empty());
        if empty {
            // Says nothing a fresh state would not: not held, so devices that never come near a
            // threshold cost no memory.
            self.states.remove(&key);
        }
        if changed {
            self.changed.insert(key);
        }
        transition
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::Rules;

    const SECOND: i64 = 1_000;

    fn engine(rules: &str) -> Engine {
        Engine::new(Rules::parse(rules).unwrap().rules, [])
    }

    fn reading(device: &str, at: i64, temperature: f64) -> Event {
        let mut metrics = telemetry_core::event::Metrics::new();
        metrics.insert("temperature_c", temperature);
        Event {
            device_id: device.into(),
            device_ts: at,
            received_at: at,
            seq: None,
            metrics,
            attributes: Default::default(),
            schema_version: 1,
            quality: Default::default(),
        }
    }

    fn feed(engine: &mut Engine, readings: &[(i64, f64)]) -> Vec<(Status, i64)> {
        readings
            .iter()
            .flat_map(|(at, value)| engine.event(&reading("pico-1", *at, *value), *at))
            .map(|transition| (transition.status, transition.started_at))
            .collect()
    }

    const HOT: &str = "[[rules]]\nname = \"hot\"\nwhen = \"temperature_c > 40 for 2m\"\n";

    #[test]
    fn a_threshold_fires_once_after_holding_for_its_duration_and_resolves_once() {
        let mut engine = engine(HOT);
        let transitions = feed(
            &mut engine,
            &[
                (0, 30.0),
                (10 * SECOND, 41.0),  // pending since 10 s
                (70 * SECOND, 45.0),  // 60 s: still pending
                (130 * SECOND, 42.0), // 120 s: fires
                (140 * SECOND, 44.0), // still firing: nothing new
                (200 * SECOND, 39.0), // false since 200 s
                (260 * SECOND, 41.0), // true again: the clearing starts over
                (270 * SECOND, 30.0), // false since 270 s
                (389 * SECOND, 30.0), // 119 s: not yet
                (390 * SECOND, 30.0), // 120 s: resolves
                (400 * SECOND, 30.0),
            ],
        );
        assert_eq!(
            transitions,
            [
                (Status::Firing, 10 * SECOND),
                (Status::Resolved, 10 * SECOND)
            ]
        );
    }

    #[test]
    fn a_value_hovering_at_the_threshold_never_fires() {
        let mut engine = engine(HOT);
        let readings: Vec<(i64, f64)> = (0..100)
            .map(|step| (step * 30 * SECOND, if step % 3 == 2 { 39.0 } else { 41.0 }))
            .collect();
        assert_eq!(feed(&mut engine, &readings), []);
    }

    #[test]
    fn the_same_input_gives_the_same_alert_ids_and_state_survives_a_restart() {
        let mut first = engine(HOT);
        let fired: Vec<Transition> = [(0, 41.0), (120 * SECOND, 41.0)]
            .iter()
            .flat_map(|(at, value)| first.event(&reading("pico-1", *at, *value), *at))
            .collect();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].alert_id, "hot:pico-1:0");
        // Restart from the stored states: the alert is still firing, and resolves once.
        let stored: Vec<(Key, State)> = first
            .take_changes()
            .into_iter()
            .filter_map(|(key, state)| state.map(|state| (key, state)))
            .collect();
        let mut second = Engine::new(Rules::parse(HOT).unwrap().rules, stored);
        assert!(second
            .event(&reading("pico-1", 130 * SECOND, 42.0), 0)
            .is_empty());
        let resolved: Vec<Transition> = [(200 * SECOND, 30.0), (320 * SECOND, 30.0)]
            .iter()
            .flat_map(|(at, value)| second.event(&reading("pico-1", *at, *value), *at))
            .collect();
        assert_eq!(resolved.len(), 1);
        assert_eq!(
            (resolved[0].status, resolved[0].alert_id.as_str()),
            (Status::Resolved, "hot:pico-1:0")
        );
    }

    #[test]
    fn silence_fires_past_its_limit_and_resolves_on_the_next_event() {
        let mut engine = engine("[[rules]]\nname = \"quiet\"\nsilent_for = \"5m\"\n");
        assert!(engine.event(&reading("pico-1", 0, 20.0), 1_000).is_empty());
        assert!(engine.tick(200 * SECOND, true).is_empty());
        // Behind the clock (catching up): no verdict.
        assert!(engine.tick(400 * SECOND, false).is_empty());
        let fired = engine.tick(400 * SECOND, true);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].started_at, 301 * SECOND);
        assert!(engine.tick(500 * SECOND, true).is_empty(), "fires once");
        // An event that arrived before the last one seen (another partition, late) says nothing.
        assert!(engine.event(&reading("pico-1", 0, 20.0), 500).is_empty());
        let resolved = engine.event(&reading("pico-1", 0, 20.0), 600 * SECOND);
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].status, Status::Resolved);
    }

    #[test]
    fn a_dlq_rate_fires_above_its_limit_and_resolves_when_the_window_empties() {
        let mut engine = engine("[[rules]]\nname = \"bad\"\ndlq_above = 2\nwindow = \"1m\"\n");
        assert!(engine.rejection("pico-1", 0).is_empty());
        assert!(engine.rejection("pico-1", 10 * SECOND).is_empty());
        let fired = engine.rejection("pico-1", 20 * SECOND);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].value, Some(3.0));
        assert!(engine.rejection("pico-1", 30 * SECOND).is_empty());
        // The rule keeps the newest three (limit + 1): 10, 20 and 30 s, all inside (5 s, 65 s].
        assert!(
            engine.tick(65 * SECOND, true).is_empty(),
            "three still inside the window"
        );
        let resolved = engine.tick(91 * SECOND, true);
        assert_eq!(resolved.len(), 1);
        assert_eq!(resolved[0].status, Status::Resolved);
        // Another device's records count for that device only.
        assert!(engine.rejection("pico-2", 95 * SECOND).is_empty());
    }

    const QUIET_AND_HOT: &str = "[[rules]]\nname = \"quiet\"\nsilent_for = \"5m\"\n\
                                 [[rules]]\nname = \"hot\"\nwhen = \"temperature_c > 40 for 2m\"\n";
    const HOUR: i64 = 3_600 * SECOND;

    #[test]
    fn a_device_silent_past_the_forget_window_is_forgotten_and_its_firing_alerts_resolve() {
        let mut engine = Engine::new(Rules::parse(QUIET_AND_HOT).unwrap().rules, [])
            .forgetting_after(std::time::Duration::from_secs(3_600));
        // pico-1: hot for two minutes (fires), then nothing. pico-2: an event now and then.
        assert!(engine.event(&reading("pico-1", 0, 41.0), 0).is_empty());
        assert_eq!(
            engine.event(&reading("pico-1", 120 * SECOND, 42.0), 120 * SECOND)[0].status,
            Status::Firing
        );
        assert!(engine.event(&reading("pico-2", 0, 20.0), 0).is_empty());
        let quiet = engine.tick(600 * SECOND, true);
        assert_eq!(
            quiet.len(),
            2,
            "both devices silent for 5 minutes: {quiet:?}"
        );
        assert_eq!(
            engine.event(&reading("pico-2", 0, 20.0), HOUR).len(),
            1,
            "pico-2's silence resolves"
        );
        engine.take_changes();
        assert_eq!((engine.devices_tracked(), engine.states_held()), (2, 3));

        // Heard from last at 120 s: kept until the window has passed.
        assert_eq!(
            engine.forget(120 * SECOND + HOUR, true),
            Forgotten::default()
        );
        // Behind the clock (catching up): nothing is forgotten.
        assert_eq!(engine.forget(2 * HOUR, false), Forgotten::default());
        let forgotten = engine.forget(120 * SECOND + HOUR + 1, true);
        assert_eq!((forgotten.devices, forgotten.states), (1, 2));
        let mut resolved: Vec<(&str, Status, bool, Option<i64>)> = forgotten
            .transitions
            .iter()
            .map(|transition| {
                (
                    transition.alert_id.as_str(),
                    transition.status,
                    transition.forgotten,
                    transition.resolved_at,
                )
            })
            .collect();
        resolved.sort_by_key(|(alert_id, ..)| *alert_id);
        let at = Some(120 * SECOND + HOUR + 1);
        assert_eq!(
            resolved,
            [
                ("hot:pico-1:0", Status::Resolved, true, at),
                ("quiet:pico-1:420000", Status::Resolved, true, at),
            ],
            "the alerts that fired, by their ids"
        );
        // Deleted from the store; pico-2 (heard from at one hour) is kept.
        let changes = engine.take_changes();
        assert_eq!(
            changes,
            [
                ((0, "pico-1".to_string()), None),
                ((1, "pico-1".to_string()), None)
            ]
        );
        assert_eq!((engine.devices_tracked(), engine.states_held()), (1, 1));
        assert_eq!(engine.forget(2 * HOUR, true).devices, 0);
        assert_eq!(engine.forget(3 * HOUR, true).devices, 1, "then pico-2");
        assert_eq!((engine.devices_tracked(), engine.states_held()), (0, 0));
        // A forgotten device that comes back starts afresh.
        assert!(engine
            .event(&reading("pico-1", 0, 20.0), 3 * HOUR)
            .is_empty());
        assert_eq!(engine.states_held(), 1);
    }

    #[test]
    fn rejected_records_keep_a_device_and_ok_states_are_not_held() {
        let mut engine = engine(HOT).forgetting_after(std::time::Duration::from_secs(60));
        assert!(engine.event(&reading("pico-1", 0, 41.0), 0).is_empty());
        assert!(engine
            .event(&reading("pico-1", SECOND, 30.0), SECOND)
            .is_empty());
        assert_eq!(
            engine.take_changes(),
            [((0, "pico-1".to_string()), None)],
            "pending, then ok: nothing stored"
        );
        assert_eq!(engine.states_held(), 0, "nor held");
        assert_eq!(engine.devices_tracked(), 1);
        // No rule counts rejections, but they still mean the device is there.
        assert!(engine.rejection("pico-1", 50 * SECOND).is_empty());
        assert_eq!(engine.forget(100 * SECOND, true).devices, 0);
        assert_eq!(engine.forget(111 * SECOND, true).devices, 1);
        assert_eq!(engine.devices_tracked(), 0);
    }

    #[test]
    fn a_restarted_engine_knows_how_long_its_devices_have_been_silent() {
        let rules = || Rules::parse(QUIET_AND_HOT).unwrap().rules;
        let mut first = Engine::new(rules(), []);
        first.event(&reading("pico-1", 0, 41.0), 10 * SECOND);
        first.event(&reading("pico-1", 0, 41.0), 20 * SECOND);
        let saved: Vec<(Key, State)> = first
            .take_changes()
            .into_iter()
            .filter_map(|(key, state)| state.map(|state| (key, state)))
            .collect();
        assert_eq!(saved.len(), 2);
        let hot = &saved.iter().find(|((rule, _), _)| *rule == 1).unwrap().1;
        assert_eq!(
            hot.memory.last_arrival,
            Some(20 * SECOND),
            "pending: stored"
        );
        // Only the threshold's state (the silence rule was added later): its arrival time counts.
        let threshold_only: Vec<(Key, State)> = saved
            .iter()
            .filter(|((rule, _), _)| *rule == 1)
            .cloned()
            .collect();
        let window = std::time::Duration::from_secs(3_600);
        let mut second = Engine::new(rules(), threshold_only).forgetting_after(window);
        assert_eq!(second.forget(20 * SECOND + HOUR, true).devices, 0);
        assert_eq!(second.forget(20 * SECOND + HOUR + 1, true).states, 1);
        // A state from before the forget window (no arrival time): its window starts now.
        let mut old = saved[1].1.clone();
        old.memory.last_arrival = None;
        let mut third =
            Engine::new(rules(), [((1, "pico-1".to_string()), old)]).forgetting_after(window);
        assert_eq!(third.devices_tracked(), 1);
        assert_eq!(third.forget(5 * HOUR, true).devices, 0);
        assert_eq!(third.forget(6 * HOUR + 1, true).devices, 1);
    }
}
