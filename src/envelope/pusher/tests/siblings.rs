//! The sibling rules (docs/protocol.md, "The `pusher` envelope"): what the
//! server would refuse, or could fail on, is refused at the edge to that
//! tab alone; client events are checked, limited per session and one
//! request in flight; what a session keeps is counted.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use super::*;

#[test]
fn what_the_server_would_refuse_or_fail_on_is_refused_to_that_tab_alone() {
    let mut m = session(2);
    let deep = format!(
        "{}{}",
        "[".repeat(MAX_NESTING + 1),
        "]".repeat(MAX_NESTING + 1)
    );
    let cases = [
        (
            json!({"event": "pusher:subscribe", "data": {"channel": "a b"}}),
            Refused::ChannelName,
        ),
        (
            json!({"event": "pusher:subscribe", "data": {"channel": "x".repeat(165)}}),
            Refused::ChannelName,
        ),
        (
            json!({"event": "pusher:subscribe", "data": {"channel": "private-a"}}),
            Refused::Auth,
        ),
        (
            json!({"event": "pusher:subscribe", "data": {"channel": "presence-a", "auth": "k:s"}}),
            Refused::ChannelData,
        ),
        (
            json!({"event": "pusher:subscribe", "data": {"channel": "presence-a", "auth": "k:s", "channel_data": "x".repeat(1025)}}),
            Refused::ChannelData,
        ),
        (
            json!({"event": "client-x", "channel": "private-a", "data": serde_json::from_str::<Value>(&deep).unwrap()}),
            Refused::Nesting,
        ),
    ];
    for (frame, reason) in cases {
        let (fwd, out) = from_tab(&mut m, 1, frame.clone());
        assert_eq!(fwd, None, "{frame}");
        assert_eq!(errors_to(&out, 1).len(), 1, "{frame}: {out:?}");
        assert_eq!(out.len(), 2, "only that tab hears of it: {out:?}");
        assert_eq!(refused(&out), Some(reason), "{frame}");
    }
    // What a client really sends goes on: a name at Pusher's limit, every
    // character it allows, and the signed-in user's own channel.
    for channel in [
        "x".repeat(164),
        "a-Z_0=@,.;".into(),
        "#server-to-user-u1".into(),
    ] {
        let (_, out) = from_tab(&mut m, 2, subscribe(&channel));
        assert!(errors_to(&out, 2).is_empty(), "{channel}: {out:?}");
    }
    // Nesting at the limit (the event's own object is one level) is the
    // server's to judge.
    let ok = format!(
        "{}{}",
        "[".repeat(MAX_NESTING - 1),
        "]".repeat(MAX_NESTING - 1)
    );
    let (_, out) = from_tab(
        &mut m,
        1,
        serde_json::from_str::<Value>(&format!("{{\"event\":\"x\",\"data\":{ok}}}")).unwrap(),
    );
    assert!(errors_to(&out, 1).is_empty(), "{out:?}");
}

#[test]
fn one_tab_cannot_take_every_channel_of_its_session() {
    let mut m = session(2);
    for n in 0..MAX_TAB_CHANNELS {
        let (_, out) = from_tab(&mut m, 1, subscribe(&format!("c{n}")));
        assert!(errors_to(&out, 1).is_empty(), "channel {n}: {out:?}");
    }
    let (fwd, out) = from_tab(&mut m, 1, subscribe("one-more"));
    assert_eq!((fwd, errors_to(&out, 1).len(), out.len()), (None, 1, 2));
    assert_eq!(refused(&out), Some(Refused::TabChannels));
    // Its sibling still subscribes, to a new channel and to one of tab 1's.
    for channel in ["mine", "c0"] {
        let (_, out) = from_tab(&mut m, 2, subscribe(channel));
        assert!(errors_to(&out, 2).is_empty(), "{channel}: {out:?}");
    }
}

/// Two tabs subscribed to `channel`; the machine to test.
fn two_on(channel: &str, m: Pusher) -> Pusher {
    let mut m = m;
    m.upstream_frame(Message::text(GREETING), &mut Vec::new());
    m.tab_joined(t(1), &mut Vec::new());
    m.tab_joined(t(2), &mut Vec::new());
    from_tab(&mut m, 1, subscribe(channel));
    from_upstream(&mut m, succeeded(channel));
    from_tab(&mut m, 2, subscribe(channel));
    m
}

/// What tab 1's client event on `channel` does at `at`.
fn client_event_at(
    m: &mut Pusher,
    channel: &str,
    data: Value,
    at: Instant,
) -> (Option<Forward>, Vec<Effect>) {
    let mut out = Vec::new();
    let event = json!({"event": "client-x", "channel": channel, "data": data});
    m.tab_sent(t(1), text(event), || at, &mut out).unwrap();
    split_forward(1, out)
}

/// The 4301 `pusher:error` messages `out` answers tab 1 with.
fn refusals(out: &[Effect]) -> Vec<String> {
    errors_to(out, 1)
        .iter()
        .map(|e| {
            assert_eq!(e["data"]["code"], 4301, "{e}");
            e["data"]["message"].as_str().unwrap_or("").to_string()
        })
        .collect()
}

#[test]
fn client_events_the_server_would_refuse_are_refused_to_the_sender_alone() {
    let now = Instant::now();
    // On a public channel.
    let mut m = two_on("news", Pusher::new(Duration::from_secs(10)));
    let (fwd, out) = client_event_at(&mut m, "news", json!({}), now);
    assert_eq!(fwd, None);
    assert_eq!(out.len(), 2, "no sibling hears of it: {out:?}");
    assert_eq!(refused(&out), Some(Refused::ClientEventChannel));
    assert!(refusals(&out)[0].contains("private or presence"), "{out:?}");
    // Over 10 KiB of data.
    let mut m = two_on("private-a", Pusher::new(Duration::from_secs(10)));
    let (fwd, out) = client_event_at(&mut m, "private-a", json!("x".repeat(10 * 1024)), now);
    assert_eq!((fwd, out.len()), (None, 2));
    assert_eq!(refused(&out), Some(Refused::ClientEventSize));
    assert!(refusals(&out)[0].contains("exceeds limit"), "{out:?}");
    // At 10 KiB, it goes.
    let (fwd, _) = client_event_at(&mut m, "private-a", json!("x".repeat(10 * 1024 - 2)), now);
    assert!(fwd.is_some());
    // A route with client events off.
    let off = Pusher::new(Duration::from_secs(10)).with_client_events(false, 10);
    let mut m = two_on("private-a", off);
    let (fwd, out) = client_event_at(&mut m, "private-a", json!({}), now);
    assert_eq!((fwd, out.len()), (None, 2));
    assert_eq!(refused(&out), Some(Refused::ClientEventsOff));
    assert!(refusals(&out)[0].contains("not enabled"), "{out:?}");
}

#[test]
fn client_events_are_limited_per_session_in_fixed_one_second_windows() {
    let start = Instant::now();
    let mut m = two_on(
        "private-a",
        Pusher::new(Duration::from_secs(10)).with_client_events(true, 3),
    );
    let at = |ms: u64| start + Duration::from_millis(ms);
    let pong = json!({"event": "pusher:pong", "data": {}});
    for ms in [0, 100, 900] {
        let (fwd, out) = client_event_at(&mut m, "private-a", json!({}), at(ms));
        assert!(fwd.is_some(), "at {ms} ms: {out:?}");
        // Its turn ends with the pong of the ping behind it.
        from_upstream(&mut m, pong.clone());
    }
    // The fourth in the window is refused (4301), and reaches no sibling.
    let (fwd, out) = client_event_at(&mut m, "private-a", json!({}), at(999));
    assert_eq!((fwd, out.len()), (None, 2));
    assert_eq!(refused(&out), Some(Refused::ClientEventRate));
    assert_eq!(refusals(&out), ["Client event rejected due to rate limit"]);
    // A new window a second after the first began.
    let (fwd, _) = client_event_at(&mut m, "private-a", json!({}), at(1000));
    assert!(fwd.is_some());
}

#[test]
fn client_events_wait_their_turn_and_a_refusal_before_their_pong_is_the_sender_s() {
    let now = Instant::now();
    let mut m = two_on("private-a", Pusher::new(Duration::from_secs(10)));
    // Tab 2 subscribes to a new channel: its answer is pending.
    let (_, out) = from_tab(&mut m, 2, subscribe("private-b"));
    assert_eq!(out, [upstream(subscribe("private-b"))]);
    // Tab 1's client event waits behind it: nothing upstream yet.
    let (fwd, out) = client_event_at(&mut m, "private-a", json!({"n": 1}), now);
    assert_eq!(fwd, None);
    assert!(
        !out.iter()
            .any(|e| matches!(e, Effect::Upstream(_) | Effect::Forward(..))),
        "{out:?}"
    );
    // The subscribe's answer: tab 2 has it, and the event goes, with a ping.
    let out = from_upstream(&mut m, succeeded("private-b"));
    let event = json!({"event": "client-x", "channel": "private-a", "data": {"n": 1}});
    let ping = Message::text(PING);
    let sent: Vec<&Effect> = out
        .iter()
        .filter(|e| matches!(e, Effect::Upstream(_) | Effect::Forward(..)))
        .collect();
    assert!(
        matches!(&sent[..], [Effect::Forward(t1, f), Effect::Upstream(p)] if *t1 == t(1) && f.frame == text(event.clone()) && *p == ping),
        "{out:?}"
    );
    // A refusal naming no channel, before the pong: tab 1's alone.
    let error = json!({"event": "pusher:error", "data": {"code": 4301, "message": "Client event rejected due to rate limit"}});
    let out = from_upstream(&mut m, error.clone());
    assert_eq!(
        out,
        [Effect::Answer {
            tab: t(1),
            msg: text(error)
        }]
    );
    // Until the pong, the next request waits; then it goes.
    let (_, out) = from_tab(&mut m, 2, subscribe("private-c"));
    assert_eq!(out, []);
    let out = from_upstream(&mut m, json!({"event": "pusher:pong", "data": {}}));
    assert_eq!(out, [upstream(subscribe("private-c"))]);
}

#[test]
fn what_the_session_keeps_is_counted_and_a_subscribe_frame_is_let_go_once_answered() {
    let mut m = session(2);
    let empty = m.held();
    let big = |channel: &str| {
        json!({"event": "pusher:subscribe",
            "data": {"channel": channel, "auth": "k".repeat(60_000)}})
    };
    // One in flight, one queued behind it: both frames are kept.
    from_tab(&mut m, 1, big("private-a"));
    from_tab(&mut m, 2, big("private-b"));
    let waiting = m.held();
    assert!(waiting >= empty + 120_000, "{empty} → {waiting}");
    // Answered: each frame is let go (a later tab is answered here).
    from_upstream(&mut m, succeeded("private-a"));
    from_upstream(&mut m, succeeded("private-b"));
    let answered = m.held();
    assert!(answered < empty + 2_000, "{empty} → {answered}");
    // A presence channel's members count, as they come and go.
    from_tab(&mut m, 1, subscribe("presence-a"));
    let members = json!({"presence": {"ids": ["u1"], "hash": {"u1": {}}, "count": 1}});
    from_upstream(
        &mut m,
        json!({"event": "pusher_internal:subscription_succeeded", "channel": "presence-a",
            "data": members.to_string()}),
    );
    let before = m.held();
    let info = json!({"name": "x".repeat(5_000)});
    let added = json!({"event": "pusher_internal:member_added", "channel": "presence-a",
        "data": json!({"user_id": "u2", "user_info": info}).to_string()});
    from_upstream(&mut m, added);
    assert!(m.held() >= before + 5_000, "{before} → {}", m.held());
    let removed = json!({"event": "pusher_internal:member_removed", "channel": "presence-a",
        "data": json!({"user_id": "u2"}).to_string()});
    from_upstream(&mut m, removed);
    assert_eq!(m.held(), before);
    // A cache channel's last event counts until the next replaces it.
    subscribed(&mut m, "cache-a");
    let before = m.held();
    let event = json!({"event": "e", "channel": "cache-a", "data": "y".repeat(8_000)});
    from_upstream(&mut m, event);
    assert!(m.held() >= before + 8_000);
}

#[test]
fn a_request_the_server_never_answers_gives_up_its_turn_after_30_s() {
    let mut m = session(2);
    let t0 = Instant::now();
    // Tab 1's subscribe is in flight and never answered; tab 2's waits.
    from_tab(&mut m, 1, subscribe("private-a"));
    let (_, queued) = from_tab(&mut m, 2, subscribe("private-b"));
    assert!(queued.is_empty(), "it waits its turn: {queued:?}");
    let deadline = m.next_deadline(t0).expect("a deadline");
    assert!(deadline <= t0 + REQUEST_TURN);
    let mut out = Vec::new();
    m.tick(t0 + REQUEST_TURN - Duration::from_secs(1), &mut out);
    assert!(!out.contains(&upstream(subscribe("private-b"))), "{out:?}");
    let mut out = Vec::new();
    m.tick(t0 + REQUEST_TURN, &mut out);
    assert!(out.contains(&upstream(subscribe("private-b"))), "{out:?}");
    // Both answers are still taken when they come.
    let out = from_upstream(&mut m, succeeded("private-b"));
    assert_eq!(out, [to_tabs(&[2], text(succeeded("private-b")))]);
    let out = from_upstream(&mut m, succeeded("private-a"));
    assert_eq!(out, [to_tabs(&[1], text(succeeded("private-a")))]);
}
