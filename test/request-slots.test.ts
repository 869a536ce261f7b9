// The request decorations (lib/request-slots.ts): null until set, and request.consulJwt built
// from an allowed request's tokens on its first read only.
import t from 'tap'
import Fastify from 'fastify'
import { RequestTokens } from '../lib/jwt/request-tokens'
import type { ActiveProvider } from '../lib/jwt/provider'
import type { FoundToken } from '../lib/jwt/locations'
import { decorateRequestSlots, setRequestTokens } from '../lib/request-slots'

t.test('consulJwt: the payloads object is built on first read, once; the setter still wins', async (t) => {
  const app = Fastify()
  decorateRequestSlots(app)
  const tokens = new RequestTokens()
  const payload = Object.freeze({ sub: 'user-1' })
  const found: FoundToken = { token: 'a.b.c', location: { kind: 'header', name: 'authorization', prefix: 'Bearer ', forward: false }, repeated: false }
  tokens.accept({ config: { name: 'idp' } } as unknown as ActiveProvider, found, payload)
  app.get('/', async (request) => {
    const before = [request.consulJwt, request.consulSource, request.consulDecision]
    setRequestTokens(request, tokens)
    const first = request.consulJwt
    const second = request.consulJwt
    request.consulJwt = { other: payload }
    return { before, first, same: first === second, set: request.consulJwt }
  })
  const res = await app.inject('/')
  t.same(res.json(), { before: [null, null, null], first: { idp: { sub: 'user-1' } }, same: true, set: { other: { sub: 'user-1' } } })
})
