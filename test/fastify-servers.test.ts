// What the plugin reads from Fastify's internals, checked against the installed Fastify.
import t from 'tap'
import Fastify from 'fastify'
import { routerOptionsOf, serverBindingsOf } from '../lib/fastify-servers'

t.test('router options are read where Fastify 5 keeps them, with Fastify\'s defaults', async (t) => {
  t.same(routerOptionsOf(Fastify()), { ignoreTrailingSlash: false, ignoreDuplicateSlashes: false, caseSensitive: true, useSemicolonDelimiter: false })
  const custom = Fastify({ routerOptions: { ignoreTrailingSlash: true, ignoreDuplicateSlashes: true, caseSensitive: false, useSemicolonDelimiter: true } } as never)
  t.same(routerOptionsOf(custom), { ignoreTrailingSlash: true, ignoreDuplicateSlashes: true, caseSensitive: false, useSemicolonDelimiter: true })
  t.same(routerOptionsOf({ initialConfig: { ignoreTrailingSlash: true } } as never).ignoreTrailingSlash, true, 'older layout: top-level keys')
})

t.test('server bindings: found on a Fastify instance, null elsewhere', async (t) => {
  t.same(serverBindingsOf(Fastify()), [])
  t.equal(serverBindingsOf({}), null)
  t.equal(serverBindingsOf({ [Symbol('fastify.serverBindings')]: 'not a list' }), null)
})
