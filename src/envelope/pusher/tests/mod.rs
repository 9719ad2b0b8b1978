//! The `pusher` state machine against docs/protocol.md's table, row by row,
//! with plain values: frames in, effects out.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::*;
use crate::cause::Closing;
use crate::envelope::Saving;

const GREETING: &str = r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"123.456\",\"activity_timeout\":30}"}"#;

fn t(n: u64) -> TabId {
    TabId(n)
}

fn text(v: Value) -> Message {
    Message::text(v.to_string())
}

/// A session's machine, greeted, with tabs 1..=n joined.
fn session(n: u64) -> Pusher {
    let mut m = Pusher::new(Duration::from_secs(10));
    let mut out = Vec::new();
    m.upstream_frame(Message::text(GREETING), &mut out);
    for i in 1..=n {
        m.tab_joined(t(i), &mut out);
    }
    m
}

/// What a tab's frame does: what it forwards upstream (at most one
/// forward, of that tab's), and its other effects.
fn from_tab(m: &mut Pusher, tab: u64, v: Value) -> (Option<Forward>, Vec<Effect>) {
    let mut out = Vec::new();
    m.tab_sent(t(tab), text(v), Instant::now, &mut out).unwrap();
    split_forward(tab, out)
}

fn split_forward(tab: u64, out: Vec<Effect>) -> (Option<Forward>, Vec<Effect>) {
    let mut forward = None;
    let mut rest = Vec::new();
    for effect in out {
        match effect {
            Effect::Forward(from, f) => {
                assert_eq!(from, t(tab), "a forward of the sending tab's");
                assert!(forward.replace(f).is_none(), "one forward per frame");
            }
            other => rest.push(other),
        }
    }
    (forward, rest)
}

fn from_upstream(m: &mut Pusher, v: Value) -> Vec<Effect> {
    let mut out = Vec::new();
    m.upstream_frame(text(v), &mut out);
    out
}

/// A tab's subscribe as pusher-js sends it: with `auth` (the server ignores
/// it on a public channel), and `channel_data` on a presence channel.
fn subscribe(channel: &str) -> Value {
    let mut sub =
        json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": "key:sig"}});
    if channel.starts_with("presence-") {
        sub["data"]["channel_data"] = json!("{\"user_id\":\"u1\"}");
    }
    sub
}

fn succeeded(channel: &str) -> Value {
    json!({"event": "pusher_internal:subscription_succeeded", "channel": channel, "data": "{}"})
}

fn upstream(v: Value) -> Effect {
    Effect::Upstream(text(v))
}

fn to_tabs(ids: &[u64], msg: Message) -> Effect {
    let len = msg.len();
    Effect::Deliver {
        to: Target::Tabs {
            ids: ids.iter().map(|&n| t(n)).collect(),
            foreign: 0,
        },
        msg,
        len,
    }
}

fn answer(tab: u64, msg: Message) -> Effect {
    Effect::Answer { tab: t(tab), msg }
}

/// The reason `out` counts a refusal at the edge for, if it does.
fn refused(out: &[Effect]) -> Option<Refused> {
    out.iter().find_map(|e| match e {
        Effect::Refused(r) => Some(*r),
        _ => None,
    })
}

/// The `pusher:error` frames answered to `tab`, as JSON.
fn errors_to(out: &[Effect], tab: u64) -> Vec<Value> {
    out.iter()
        .filter_map(|e| match e {
            Effect::Answer { tab: to, msg } if *to == t(tab) => {
                let v: Value = serde_json::from_str(msg.to_text().ok()?).ok()?;
                (v["event"] == "pusher:error").then_some(v)
            }
            _ => None,
        })
        .collect()
}

/// Subscribes tab 1 to `channel` and has the upstream confirm it.
fn subscribed(m: &mut Pusher, channel: &str) {
    from_tab(m, 1, subscribe(channel));
    from_upstream(m, succeeded(channel));
}

#[test]
fn a_tab_gets_the_sessions_greeting_as_the_upstream_sent_it() {
    let mut m = Pusher::new(Duration::from_secs(10));
    let mut out = Vec::new();
    m.tab_joined(t(1), &mut out);
    assert_eq!(
        out,
        [],
        "no connection_established before the socket id is known"
    );
    m.upstream_frame(Message::text(GREETING), &mut out);
    m.tab_joined(t(2), &mut out);
    assert_eq!(
        out,
        [
            answer(1, Message::text(GREETING)),
            answer(2, Message::text(GREETING))
        ]
    );
    assert_eq!(m.activity_timeout(), Duration::from_secs(30));
}

#[test]
fn the_first_subscribe_goes_upstream_unchanged_and_its_answer_to_every_waiting_tab() {
    let mut m = session(2);
    let (fwd, out) = from_tab(&mut m, 1, subscribe("private-a"));
    assert_eq!(fwd, None);
    assert_eq!(out, [upstream(subscribe("private-a"))]);
    // A second tab while it is pending: nothing more upstream, a saving.
    let (_, out) = from_tab(&mut m, 2, subscribe("private-a"));
    assert_eq!(out, [Effect::Avoided(Saving::Subscription)]);
    let out = from_upstream(&mut m, succeeded("private-a"));
    assert_eq!(out, [to_tabs(&[1, 2], text(succeeded("private-a")))]);
}

#[test]
fn a_later_subscribe_is_answered_locally_once_and_nothing_goes_upstream() {
    let mut m = session(2);
    subscribed(&mut m, "private-a");
    let (_, out) = from_tab(&mut m, 2, subscribe("private-a"));
    assert_eq!(
        out,
        [
            Effect::Avoided(Saving::Subscription),
            answer(2, text(succeeded("private-a")))
        ]
    );
    // The same tab subscribing again is not answered twice.
    let (_, out) = from_tab(&mut m, 2, subscribe("private-a"));
    assert_eq!(out, []);
}

#[test]
fn one_subscription_is_in_flight_upstream_at_a_time() {
    let mut m = session(1);
    let (_, first) = from_tab(&mut m, 1, subscribe("a"));
    let (_, second) = from_tab(&mut m, 1, subscribe("b"));
    assert_eq!(first, [upstream(subscribe("a"))]);
    assert_eq!(second, [], "b waits for a's answer");
    let out = from_upstream(&mut m, succeeded("a"));
    assert_eq!(
        out,
        [
            to_tabs(&[1], text(succeeded("a"))),
            upstream(subscribe("b"))
        ]
    );
}

#[test]
fn subscribes_wait_for_the_greeting() {
    let mut m = Pusher::new(Duration::from_secs(10));
    let mut out = Vec::new();
    m.tab_joined(t(1), &mut out);
    m.tab_sent(t(1), text(subscribe("a")), Instant::now, &mut out)
        .unwrap();
    assert_eq!(out, []);
    m.upstream_frame(Message::text(GREETING), &mut out);
    assert_eq!(
        out,
        [answer(1, Message::text(GREETING)), upstream(subscribe("a"))]
    );
}

#[test]
fn a_refused_subscription_reaches_its_tabs_and_is_not_left_pending() {
    let mut m = session(2);
    from_tab(&mut m, 1, subscribe("private-a"));
    from_tab(&mut m, 2, subscribe("private-a"));
    let refusal = json!({"event": "pusher:subscription_error", "channel": "private-a", "data": "{\"type\":\"AuthError\",\"status\":401}"});
    let out = from_upstream(&mut m, refusal.clone());
    assert_eq!(out, [to_tabs(&[1, 2], text(refusal))]);
    // A later subscribe tries again.
    let (_, out) = from_tab(&mut m, 1, subscribe("private-a"));
    assert_eq!(out, [upstream(subscribe("private-a"))]);
}

#[test]
fn a_pusher_error_without_channel_answers_the_subscription_in_flight() {
    let mut m = session(1);
    from_tab(&mut m, 1, subscribe("private-a"));
    from_tab(&mut m, 1, subscribe("b"));
    // Pusher: code null, "Invalid signature"; sockudo: 4009.
    let error =
        json!({"event": "pusher:error", "data": {"code": null, "message": "Invalid signature"}});
    let out = from_upstream(&mut m, error.clone());
    assert_eq!(
        out,
        [to_tabs(&[1], text(error.clone())), upstream(subscribe("b"))]
    );
    // With nothing in flight, an error reaches every tab.
    from_upstream(&mut m, succeeded("b"));
    let out = from_upstream(&mut m, error.clone());
    assert_eq!(
        out,
        [Effect::Deliver {
            to: Target::All,
            len: text(error.clone()).len(),
            msg: text(error)
        }]
    );
}

#[test]
fn unsubscribing_the_last_tab_unsubscribes_upstream_at_once() {
    let mut m = session(2);
    subscribed(&mut m, "a");
    from_tab(&mut m, 2, subscribe("a"));
    let unsubscribe = json!({"event": "pusher:unsubscribe", "data": {"channel": "a"}});
    let (_, out) = from_tab(&mut m, 1, unsubscribe.clone());
    assert_eq!(out, [], "tab 2 is still subscribed");
    // Tab 1 receives nothing more from the channel.
    let event = json!({"event": "x", "channel": "a", "data": "1"});
    assert_eq!(
        from_upstream(&mut m, event.clone()),
        [to_tabs(&[2], text(event))]
    );
    let (_, out) = from_tab(&mut m, 2, unsubscribe.clone());
    assert_eq!(out, [upstream(unsubscribe)]);
}

#[test]
fn a_channel_whose_tabs_left_is_unsubscribed_after_linger_and_a_reload_reuses_it() {
    let start = Instant::now();
    let mut m = session(1);
    subscribed(&mut m, "presence-a");
    m.tab_left(t(1), 1001, start, &mut Vec::new());
    let mut out = Vec::new();
    m.tick(start + Duration::from_secs(5), &mut out);
    assert!(!out
        .iter()
        .any(|e| matches!(e, Effect::Upstream(m) if m.to_text().unwrap().contains("unsubscribe"))));
    // The reloaded tab subscribes within linger: answered locally.
    m.tab_joined(t(2), &mut out);
    let (_, out) = from_tab(&mut m, 2, subscribe("presence-a"));
    assert!(
        matches!(
            &out[..],
            [Effect::Avoided(Saving::Subscription), Effect::Answer { .. }]
        ),
        "{out:?}"
    );
    // Left again, and linger passes: unsubscribed upstream.
    m.tab_left(t(2), 1001, start + Duration::from_secs(6), &mut Vec::new());
    let mut out = Vec::new();
    m.tick(start + Duration::from_secs(16), &mut out);
    let unsubscribe = json!({"event": "pusher:unsubscribe", "data": {"channel": "presence-a"}});
    assert!(out.contains(&upstream(unsubscribe)), "{out:?}");
}

#[test]
fn an_event_reaches_the_channels_tabs_and_no_other() {
    let mut m = session(3);
    subscribed(&mut m, "a");
    from_tab(&mut m, 3, subscribe("a"));
    let event = json!({"event": "update", "channel": "a", "data": "{\"n\":1}"});
    assert_eq!(
        from_upstream(&mut m, event.clone()),
        [to_tabs(&[1, 3], text(event))]
    );
    let elsewhere = json!({"event": "update", "channel": "b", "data": "{}"});
    assert_eq!(from_upstream(&mut m, elsewhere), []);
}

#[test]
fn presence_members_are_kept_current_for_later_tabs() {
    let mut m = session(2);
    let sub = json!({"event": "pusher:subscribe", "data": {"channel": "presence-room", "auth": "k:s", "channel_data": "{\"user_id\":\"me\"}"}});
    from_tab(&mut m, 1, sub.clone());
    let first = json!({"presence": {"ids": ["me", "bob"], "hash": {"me": null, "bob": {"name": "Bob"}}, "count": 2}});
    from_upstream(
        &mut m,
        json!({"event": "pusher_internal:subscription_succeeded", "channel": "presence-room", "data": first.to_string()}),
    );
    from_upstream(
        &mut m,
        json!({"event": "pusher_internal:member_added", "channel": "presence-room", "data": "{\"user_id\":\"eve\",\"user_info\":{\"name\":\"Eve\"}}"}),
    );
    from_upstream(
        &mut m,
        json!({"event": "pusher_internal:member_removed", "channel": "presence-room", "data": "{\"user_id\":\"bob\"}"}),
    );
    let (_, out) = from_tab(&mut m, 2, sub);
    let [Effect::Avoided(Saving::Subscription), Effect::Answer { tab, msg }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(*tab, t(2));
    let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!(v["event"], "pusher_internal:subscription_succeeded");
    let data: Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
    assert_eq!(
        data["presence"],
        json!({"ids": ["me", "eve"], "hash": {"me": null, "eve": {"name": "Eve"}}, "count": 2})
    );
}

#[test]
fn a_client_event_goes_upstream_once_and_to_the_sibling_tabs_on_its_channel() {
    let mut m = session(3);
    let sub = json!({"event": "pusher:subscribe", "data": {"channel": "presence-room", "auth": "k:s", "channel_data": "{\"user_id\":\"u7\"}"}});
    from_tab(&mut m, 1, sub.clone());
    from_upstream(
        &mut m,
        json!({"event": "pusher_internal:subscription_succeeded", "channel": "presence-room", "data": "{\"presence\":{\"ids\":[\"u7\"],\"hash\":{\"u7\":null},\"count\":1}}"}),
    );
    from_tab(&mut m, 2, sub);
    // A `user_id` the tab sends is not whom its sibling sees as the sender.
    let typing = json!({"event": "client-typing", "channel": "presence-room", "data": {"on": true}, "user_id": "ceo"});
    let (fwd, out) = from_tab(&mut m, 1, typing.clone());
    assert_eq!(fwd.unwrap().frame, text(typing));
    // Tab 3 is not subscribed, tab 1 sent it: only tab 2, with the user id.
    // (Then the ping whose pong ends the event's turn.)
    let [Effect::Deliver { to, msg, .. }, Effect::Avoided(Saving::Deliveries(1)), Effect::Upstream(ping)] =
        &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!(*ping, Message::text(PING));
    assert_eq!(
        *to,
        Target::Tabs {
            ids: vec![t(2)],
            foreign: 0
        }
    );
    let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
    assert_eq!(
        v,
        json!({"event": "client-typing", "channel": "presence-room", "data": {"on": true}, "user_id": "u7"})
    );
    // On a channel the tab is not subscribed to: an error, nothing upstream.
    let (fwd, out) = from_tab(
        &mut m,
        3,
        json!({"event": "client-x", "channel": "presence-room", "data": {}}),
    );
    assert_eq!(fwd, None);
    assert_eq!(errors_to(&out, 3).len(), 1);
}

#[test]
fn the_first_sign_in_goes_upstream_and_later_tabs_get_its_answer() {
    let mut m = session(3);
    let signin =
        json!({"event": "pusher:signin", "data": {"auth": "k:s", "user_data": "{\"id\":\"u1\"}"}});
    let (_, out) = from_tab(&mut m, 1, signin.clone());
    assert_eq!(out, [upstream(signin.clone())]);
    let success = json!({"event": "pusher:signin_success", "data": "{\"user_data\":\"{\\\"id\\\":\\\"u1\\\"}\"}"});
    assert_eq!(
        from_upstream(&mut m, success.clone()),
        [to_tabs(&[1], text(success.clone()))]
    );
    let (_, out) = from_tab(&mut m, 2, signin);
    assert_eq!(out, [answer(2, text(success))]);
    // The user's channel reaches the tabs that signed in, not tab 3.
    let personal = json!({"event": "note", "channel": "#server-to-user-u1", "data": "{}"});
    assert_eq!(
        from_upstream(&mut m, personal.clone()),
        [to_tabs(&[1, 2], text(personal))]
    );
}

#[test]
fn pings_are_answered_where_they_arrive_and_never_cross() {
    let mut m = session(1);
    let (fwd, out) = from_tab(&mut m, 1, json!({"event": "pusher:ping", "data": {}}));
    assert_eq!(fwd, None);
    let pong = Message::text(r#"{"event":"pusher:pong","data":{}}"#);
    assert_eq!(
        out,
        [Effect::Avoided(Saving::Ping), answer(1, pong.clone())]
    );
    let out = from_upstream(&mut m, json!({"event": "pusher:ping", "data": {}}));
    assert_eq!(out, [Effect::Upstream(pong)]);
    assert_eq!(
        from_upstream(&mut m, json!({"event": "pusher:pong", "data": {}})),
        []
    );
}

#[test]
fn a_silent_upstream_is_pinged_within_its_activity_timeout() {
    let start = Instant::now();
    let mut m = session(1);
    let ping = Effect::Upstream(Message::text(r#"{"event":"pusher:ping","data":{}}"#));
    let mut out = Vec::new();
    m.tick(start, &mut out);
    m.tick(start + Duration::from_secs(10), &mut out);
    assert_eq!(out, [], "heard from 10 s ago; the timeout is 30 s");
    m.tick(start + Duration::from_secs(20), &mut out);
    assert_eq!(
        out,
        std::slice::from_ref(&ping),
        "silent for half its activity timeout"
    );
    // Hearing from it resets the count.
    out.clear();
    from_upstream(&mut m, json!({"event": "pusher:pong", "data": {}}));
    m.tick(start + Duration::from_secs(30), &mut out);
    m.tick(start + Duration::from_secs(40), &mut out);
    assert_eq!(out, []);
}

#[test]
fn a_cache_channel_gives_a_later_tab_its_last_event_or_a_miss() {
    let mut m = session(3);
    subscribed(&mut m, "cache-a");
    let (_, out) = from_tab(&mut m, 2, subscribe("cache-a"));
    let miss = json!({"event": "pusher:cache_miss", "channel": "cache-a", "data": "{}"});
    assert_eq!(
        out,
        [
            Effect::Avoided(Saving::Subscription),
            answer(2, text(succeeded("cache-a"))),
            answer(2, text(miss))
        ]
    );
    let event = json!({"event": "price", "channel": "cache-a", "data": "{\"p\":3}"});
    from_upstream(&mut m, event.clone());
    let (_, out) = from_tab(&mut m, 3, subscribe("cache-a"));
    assert_eq!(
        out,
        [
            Effect::Avoided(Saving::Subscription),
            answer(3, text(succeeded("cache-a"))),
            answer(3, text(event))
        ]
    );
}

#[test]
fn a_loss_closes_tabs_with_4200_unless_the_server_gave_a_code_to_act_on() {
    let m = session(1);
    for lost in [
        Lost::Closed(None),
        Lost::Closed(Some(Closing::code(1006))),
        Lost::Closed(Some(Closing::code(4201))),
        Lost::Silent,
    ] {
        assert_eq!(m.upstream_lost(&lost).code(), 4200, "{lost}");
    }
    for code in [4004, 4100, 4301] {
        let lost = Lost::Closed(Some(Closing::code(code)));
        assert_eq!(m.upstream_lost(&lost).code(), code);
    }
    // The server's own words reach the tabs.
    let lost = Lost::Closed(Some(Closing {
        code: 4009,
        reason: "You got disconnected by the app.".into(),
    }));
    let cause = m.upstream_lost(&lost);
    assert_eq!(cause.row().reason, "You got disconnected by the app.");
}

#[test]
fn bad_input_gets_that_tab_an_error_and_goes_nowhere() {
    let mut m = session(2);
    for bad in [
        Message::text("not json"),
        Message::text(r#"{"data":{}}"#),
        text(json!({"event": "pusher:subscribe", "data": {}})),
        text(json!({"event": "pusher:unsubscribe", "data": {"channel": "never"}})),
        text(
            json!({"event": "pusher:subscribe", "data": {"channel": "x".repeat(MAX_CHANNEL_NAME + 1)}}),
        ),
        Message::binary(vec![1u8, 2]),
    ] {
        let mut out = Vec::new();
        m.tab_sent(t(1), bad.clone(), Instant::now, &mut out)
            .unwrap();
        let (fwd, out) = split_forward(1, out);
        assert_eq!(fwd, None, "{bad:?}");
        assert_eq!(errors_to(&out, 1).len(), 1, "{bad:?}: {out:?}");
        assert_eq!(out.len(), 2, "only that tab hears of it: {out:?}");
        assert!(refused(&out).is_some(), "counted: {out:?}");
    }
}

#[test]
fn other_events_from_a_tab_go_upstream_unchanged() {
    let mut m = session(1);
    let custom = json!({"event": "pusher:custom", "data": {"x": 1}});
    let (fwd, out) = from_tab(&mut m, 1, custom.clone());
    assert_eq!(fwd.unwrap().frame, text(custom));
    assert_eq!(out, []);
}

/// The deadlines, on a fake clock: what the session waits for instead of
/// its keepalive tick.
mod deadlines {
    use super::*;

    const SHORT: &str = r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":2}"}"#;

    fn unsubscribes(out: &[Effect]) -> usize {
        out.iter()
            .filter(|e| matches!(e, Effect::Upstream(m) if m.to_text().unwrap_or("").contains("pusher:unsubscribe")))
            .count()
    }

    fn pings(out: &[Effect]) -> usize {
        out.iter()
            .filter(|e| matches!(e, Effect::Upstream(m) if m.to_text().unwrap_or("").contains("pusher:ping")))
            .count()
    }

    #[test]
    fn a_channel_lingers_exactly_linger_after_its_last_tab_left() {
        let start = Instant::now();
        let mut m = session(1);
        subscribed(&mut m, "private-a");
        let keepalive = m.next_deadline(start).unwrap();
        m.tab_left(t(1), 1001, start, &mut Vec::new());
        // The linger (10 s) ends before the keepalive (15 s).
        assert_eq!(
            m.next_deadline(start),
            Some(start + Duration::from_secs(10))
        );
        assert!(keepalive >= start + Duration::from_secs(15));
        let mut out = Vec::new();
        m.tick(start + Duration::from_secs(10), &mut out);
        assert_eq!(unsubscribes(&out), 1, "{out:?}");
        // Nothing lingers any more: only the keepalive is left.
        assert_eq!(
            m.next_deadline(start + Duration::from_secs(10)),
            Some(keepalive)
        );
    }

    #[test]
    fn a_silent_upstream_is_pinged_at_half_its_activity_timeout() {
        let start = Instant::now();
        let mut m = Pusher::new(Duration::from_secs(10));
        let mut out = Vec::new();
        m.upstream_frame(Message::text(SHORT), &mut out);
        let due = m.next_deadline(start).unwrap();
        assert_eq!(due, start + Duration::from_secs(1), "half of 2 s");
        m.tick(due, &mut out);
        assert_eq!(pings(&out), 1);
        // And again a second after that, while it stays silent.
        assert_eq!(m.next_deadline(due), Some(due + Duration::from_secs(1)));
        // A frame from it moves the deadline.
        let later = due + Duration::from_millis(700);
        from_upstream(&mut m, json!({"event": "pusher:pong", "data": {}}));
        assert_eq!(m.next_deadline(later), Some(later + Duration::from_secs(1)));
    }

    #[test]
    fn a_tab_back_within_linger_takes_the_deadline_away() {
        let start = Instant::now();
        let mut m = session(1);
        subscribed(&mut m, "private-a");
        m.tab_left(t(1), 1001, start, &mut Vec::new());
        assert_eq!(
            m.next_deadline(start),
            Some(start + Duration::from_secs(10))
        );
        let mut out = Vec::new();
        m.tab_joined(t(2), &mut out);
        from_tab(&mut m, 2, subscribe("private-a"));
        let next = m.next_deadline(start + Duration::from_secs(1)).unwrap();
        assert!(
            next > start + Duration::from_secs(10),
            "only the keepalive: {next:?}"
        );
        let mut out = Vec::new();
        m.tick(start + Duration::from_secs(10), &mut out);
        assert_eq!(unsubscribes(&out), 0);
    }
}

mod siblings;
