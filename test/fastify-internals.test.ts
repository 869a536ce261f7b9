// What the plugin reads from Fastify's internals, checked against the installed Fastify.
import t from 'tap'
import net from 'node:net'
import Fastify, { LogController } from 'fastify'
import websocket from '@fastify/websocket'
import { fastifyWebsocketListenerTest, guardCallNotFound, holdListening, isRootInstance, replacedRouterHandlers, requestIdLabelOf, routeConfigReader, routerOptionsOf, serverBindingsOf } from '../lib/fastify-internals'

t.test('router options are read where Fastify 5 keeps them, with Fastify\'s defaults', async (t) => {
  t.same(routerOptionsOf(Fastify()), { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false })
  const custom = Fastify({ routerOptions: { ignoreTrailingSlash: true, ignoreDuplicateSlashes: true, caseSensitive: false, useSemicolonDelimiter: true } } as never)
  t.same(routerOptionsOf(custom), { ignoreTrailingSlash: true, ignoreDuplicateSlashes: true, caseSensitive: false, useSemicolonDelimiter: true })
  t.same(routerOptionsOf({ initialConfig: { ignoreTrailingSlash: true } } as never).ignoreTrailingSlash, true, 'older layout: top-level keys')
})

t.test('root instance: the app itself, not an encapsulated child', async (t) => {
  const app = Fastify()
  t.equal(isRootInstance(app), true)
  let child: object | null = null
  await app.register(async (instance) => { child = instance })
  await app.ready()
  t.equal(isRootInstance(child as unknown as object), false)
  await app.close()
})

t.test('server bindings: found on a Fastify instance, null elsewhere', async (t) => {
  t.same(serverBindingsOf(Fastify()), [])
  t.equal(serverBindingsOf({}), null)
  t.equal(serverBindingsOf({ [Symbol('fastify.serverBindings')]: 'not a list' }), null)
})

t.test('route config: read from the route context, or through routeOptions when Fastify has none', async (t) => {
  const app = Fastify()
  const seen: Array<[unknown, unknown]> = []
  const read = routeConfigReader()
  app.get('/x', { config: { marker: 'x' } }, async (request) => {
    seen.push([read(request).marker, request.routeOptions.config.marker])
    return 'ok'
  })
  await app.inject('/x')
  await app.inject('/x')
  t.same(seen, [['x', 'x'], ['x', 'x']])
  const plain = { routeOptions: { config: { marker: 'public' } } }
  t.equal(routeConfigReader()(plain).marker, 'public', 'no private symbol: the public getter')
  const empty = { [Symbol('fastify.context')]: {}, routeOptions: { config: { marker: 'public' } } }
  t.equal(routeConfigReader()(empty).marker, 'public', 'a context without config: the public getter')
})

t.test('request id label: Fastify\'s own, reqId when this Fastify does not say (docs/semantics.md#log-shape)', async (t) => {
  t.equal(requestIdLabelOf(Fastify()), 'reqId')
  t.equal(requestIdLabelOf({ initialConfig: {} }), 'reqId')
  t.equal(requestIdLabelOf({ initialConfig: { requestIdLogLabel: 'rid' } }), 'rid')
  // Fastify 5.12's log controller holds the label its request logger writes; initialConfig keeps the default.
  const controlled = Fastify({ logController: new LogController({ requestIdLogLabel: 'traceId' }) })
  t.equal(controlled.initialConfig.requestIdLogLabel, 'reqId', 'initialConfig does not say')
  t.equal(requestIdLabelOf(controlled), 'traceId')
})

t.test('holdListening: an own listen() is put back; a wrapper added over the hold is passed through; no error listener, no throw', async (t) => {
  const server = net.createServer()
  const ownListen = function (this: net.Server, ...args: unknown[]): net.Server {
    return (net.Server.prototype.listen as (...a: unknown[]) => net.Server).apply(this, args)
  }
  server.listen = ownListen as net.Server['listen']
  let release: (err?: Error) => void = () => {}
  const failed: Error[] = []
  holdListening(server, () => false, async () => await new Promise<void>((resolve, reject) => { release = (err) => err === undefined ? resolve() : reject(err) }),
    (err) => failed.push(err))
  const listened = new Promise<void>((resolve) => server.once('listening', resolve))
  server.listen(0, '127.0.0.1')
  t.equal(server.listen, ownListen, 'the own listen() is back')
  // Another wrapper over the hold (as the upgrade gate adds one): the hold stays, as a pass-through.
  const held = server.emit
  const seen: Array<string | symbol> = []
  server.emit = function (this: net.Server, event: string | symbol, ...args: unknown[]): boolean {
    seen.push(event)
    return (held as (...a: unknown[]) => boolean).call(this, event, ...args)
  } as net.Server['emit']
  server.emit('meanwhile')
  // The wrapper over the hold sees 'listening' when net emits it; the hold keeps it from the listeners.
  while (!seen.includes('listening')) await new Promise((resolve) => setImmediate(resolve))
  t.equal(server.listening, true)
  let heard = false
  listened.then(() => { heard = true }, () => {})
  await new Promise((resolve) => setTimeout(resolve, 20))
  t.equal(heard, false, '\'listening\' is held')
  release()
  await listened
  server.emit('custom')
  t.same(seen, ['meanwhile', 'listening', 'custom'], 'other events go through the hold, before and after')
  await new Promise((resolve) => server.close(resolve))

  // Refused, without an 'error' listener: the server is closed and nothing throws.
  const bare = net.createServer()
  holdListening(bare, () => false, async () => { throw new Error('refused') }, (err) => failed.push(err))
  bare.listen(0, '127.0.0.1')
  await new Promise((resolve) => bare.once('close', resolve))
  t.match(failed, [{ message: 'refused' }])
  t.equal(bare.listening, false)
})

t.test('@fastify/websocket\'s upgrade listener is recognised by its source, not by its name', async (t) => {
  const app = Fastify()
  await app.register(websocket)
  await app.ready()
  t.teardown(async () => await app.close())
  const [theirs] = app.server.listeners('upgrade') as Function[]
  const isTheirs = fastifyWebsocketListenerTest()
  t.equal(isTheirs(theirs as Function), true)
  t.equal(isTheirs(theirs as Function), true, 'remembered')
  function onUpgrade (): void {}
  t.equal(isTheirs(onUpgrade), false, 'a function of the same name is not theirs')
  t.equal(isTheirs(function tunnel () {}), false)
  const notResolvedHere = fastifyWebsocketListenerTest(() => { throw new Error('Cannot find module') })
  t.equal(notResolvedHere(theirs as Function), true, 'not resolvable from the plugin: the copy the application loaded is read')
  t.equal(notResolvedHere(onUpgrade), false)
  const nowhere = fastifyWebsocketListenerTest(() => { throw new Error('Cannot find module') }, () => [])
  t.equal(nowhere(theirs as Function), false, 'no source anywhere (bundled): treated as foreign')
})

t.test('router callbacks the application replaced are told from Fastify\'s own by their source', async (t) => {
  t.same(replacedRouterHandlers(Fastify()), [], 'Fastify\'s own')
  const custom = Fastify({ routerOptions: { defaultRoute: (_req: unknown, res: { end: () => void }) => { res.end() }, onBadUrl: () => {} } } as never)
  t.same(replacedRouterHandlers(custom), ['defaultRoute', 'onBadUrl'])
  t.same(replacedRouterHandlers(custom, []), [], 'no Fastify source to compare with: nothing reported')
  t.same(replacedRouterHandlers({}), [], 'another Fastify layout: nothing reported')
  t.same(replacedRouterHandlers({ [Symbol('fastify.options')]: { routerOptions: { defaultRoute: 'not a function' } } }, ['x']), [], 'only functions are compared')
})

t.test('guardCallNotFound: a check that answers later, and a Fastify without the Reply slot', async (t) => {
  t.equal(guardCallNotFound({ decorateReply: () => undefined }, () => null), false, 'not found: nothing decorated')
  const app = Fastify()
  let refuse = true
  t.equal(guardCallNotFound(app, async () => refuse ? Object.assign(new Error('refused'), { statusCode: 403 }) : null), true)
  app.setNotFoundHandler(async () => 'not found handler')
  app.get('/x', (_request, reply) => { reply.callNotFound() })
  const refused = await app.inject('/x')
  t.equal(refused.statusCode, 403)
  refuse = false
  const passed = await app.inject('/x')
  t.equal(passed.body, 'not found handler', 'allowed: the 404 handler answers')
  await app.close()
})
