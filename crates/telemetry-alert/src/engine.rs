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

use std::collections::{BTreeMap, VecDeque};

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
}

/// (rule index, device) → state.
pub type Key = (usize, String);

/// The states of every rule and device, with the keys changed since [`Engine::take_changes`].
pub struct Engine {
    rules: Vec<Rule>,
    states: BTreeMap<Key, State>,
    changed: std::collections::BTreeSet<Key>,
}

fn millis(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}

impl Engine {
    /// An engine for `rules` with the states `restored` (from the database; keys of rules that
    /// are no longer in the file are dropped).
    pub fn new(rules: Vec<Rule>, restored: impl IntoIterator<Item = (Key, State)>) -> Self {
        let count = rules.len();
        Engine {
            rules,
            states: restored
                .into_iter()
                .filter(|((rule, _), _)| *rule < count)
                .collect(),
            changed: Default::default(),
        }
    }

    /// The rules.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
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
                    self.step(key, holds, event.device_ts, holds.then_some(value))
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
                    });
                } else {
                    state.phase = Phase::Pending { since };
                }
            }
            (Phase::Pending { .. }, false) => {
                state.phase = Phase::Ok;
                state.value = None;
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
                    });
                    state.phase = Phase::Ok;
                    state.value = None;
                } else {
                    state.phase = Phase::Firing {
                        since,
                        fired_at,
                        clear_since: Some(clear_since),
                    };
                }
            }
        }
        if *state != before {
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
}
