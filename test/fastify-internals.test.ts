// What the plugin reads from Fastify's internals, checked against the installed Fastify.
import t from 'tap'
import Fastify from 'fastify'
import { isRootInstance, requestIdLabelOf, routeConfigReader, routerOptionsOf, serverBindingsOf } from '../lib/fastify-internals'

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
})
