// A real GraphQL over WebSocket server for tabmux's tests: graphql-ws on
// /graphql (subprotocol graphql-transport-ws) and subscriptions-transport-ws
// on /legacy (subprotocol graphql-ws), one schema for both.
//
//   node server.mjs            prints `listening <port>` once ready
//
// The schema has an event stream (`ticks`: what POST /publish sends), a live
// query (`count`: the current value first, then each change), a mutation with
// a visible side effect (`bump`: count + 1), and a query. `onConnect` refuses
// the token "bad" (graphql-ws closes 4403; the legacy server answers
// connection_error). GET /stats says what the server holds and has sent:
// open connections, active subscriptions, subscriptions started, messages
// sent, and the last connection_init payloads.

import http from 'node:http';
import { WebSocketServer } from 'ws';
import { useServer } from 'graphql-ws/use/ws';
import { SubscriptionServer } from 'subscriptions-transport-ws';
import { buildSchema, execute, subscribe } from 'graphql';

const schema = buildSchema(`
  type Query { hello: String, count: Int }
  type Mutation { bump: Int }
  type Subscription { ticks: String, count: Int }
`);

const stats = {
  connections: 0,
  connectionsTotal: 0,
  subscriptions: 0,
  subscriptionsStarted: 0,
  messagesSent: 0,
  inits: [],
};

// Pub/sub: each subscriber is a queue its async iterator drains.
const listeners = { ticks: new Set(), count: new Set() };
let count = 0;

function publish(topic, value) {
  for (const push of listeners[topic]) push(value);
}

function stream(topic, first) {
  const queue = first === undefined ? [] : [first];
  let wake = null;
  let done = false;
  const push = (v) => {
    queue.push(v);
    if (wake) wake();
  };
  listeners[topic].add(push);
  stats.subscriptions += 1;
  stats.subscriptionsStarted += 1;
  const end = () => {
    if (done) return;
    done = true;
    listeners[topic].delete(push);
    stats.subscriptions -= 1;
    if (wake) wake();
  };
  return {
    [Symbol.asyncIterator]() {
      return this;
    },
    async next() {
      while (!done && queue.length === 0) {
        await new Promise((r) => (wake = r));
        wake = null;
      }
      if (done) return { value: undefined, done: true };
      return { value: { [topic]: queue.shift() }, done: false };
    },
    async return() {
      end();
      return { value: undefined, done: true };
    },
  };
}

const root = {
  hello: () => 'world',
  count: () => count,
  bump: () => {
    count += 1;
    publish('count', count);
    return count;
  },
};
const subscriptionRoot = {
  ticks: () => stream('ticks'),
  count: () => stream('count', count),
};

const server = http.createServer((req, res) => {
  if (req.method === 'GET' && req.url === '/stats') {
    res.writeHead(200, { 'content-type': 'application/json' });
    res.end(JSON.stringify(stats));
    return;
  }
  if (req.method === 'POST' && req.url.startsWith('/publish')) {
    const text = new URL(req.url, 'http://x').searchParams.get('text') ?? '';
    publish('ticks', text);
    res.writeHead(200);
    res.end('ok');
    return;
  }
  res.writeHead(404);
  res.end();
});

function counted(socket) {
  stats.connections += 1;
  stats.connectionsTotal += 1;
  const send = socket.send.bind(socket);
  socket.send = (data, ...rest) => {
    stats.messagesSent += 1;
    return send(data, ...rest);
  };
  socket.on('close', () => (stats.connections -= 1));
}

const modern = new WebSocketServer({ noServer: true });
modern.on('connection', counted);
useServer(
  {
    schema,
    roots: { query: root, mutation: root, subscription: subscriptionRoot },
    execute,
    subscribe,
    onConnect: (ctx) => {
      stats.inits.push(ctx.connectionParams ?? null);
      return ctx.connectionParams?.token !== 'bad';
    },
  },
  modern,
);

const legacy = new WebSocketServer({ noServer: true });
legacy.on('connection', counted);
SubscriptionServer.create(
  {
    schema,
    rootValue: { ...root, ...subscriptionRoot },
    execute,
    subscribe,
    onConnect: (params) => {
      stats.inits.push(params ?? null);
      if (params?.token === 'bad') throw new Error('Forbidden');
      return true;
    },
    keepAlive: 1000,
  },
  legacy,
);

server.on('upgrade', (req, socket, head) => {
  const path = new URL(req.url, 'http://x').pathname;
  const wss = path === '/graphql' ? modern : path === '/legacy' ? legacy : null;
  if (!wss) {
    socket.destroy();
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => wss.emit('connection', ws, req));
});

server.listen(Number(process.env.PORT ?? 0), '127.0.0.1', () => {
  console.log(`listening ${server.address().port}`);
});
