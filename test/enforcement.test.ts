// The preParsing backstop, on its own: a request that reaches body parsing without a decision.
import t from 'tap'
import { consulNativeBackstop } from '../lib/enforcement'

t.test('a request without a recorded decision is denied and logged; one with a decision passes', async (t) => {
  const logged: unknown[] = []
  const headersSet: unknown[] = []
  const reply = { raw: { setHeader: (...args: unknown[]) => headersSet.push(args) } }
  const request = {
    consulDecision: null as unknown,
    method: 'POST',
    url: '/x',
    raw: { httpVersionMajor: 1, headers: { 'content-length': '5' }, socket: {} },
    log: { error: (obj: unknown) => logged.push(obj) }
  }
  let outcome: [Error | null, unknown] | undefined
  consulNativeBackstop(request as never, reply as never, 'payload', (err, payload) => { outcome = [err, payload] })
  t.match(outcome?.[0], { code: 'FST_CONSUL_NATIVE_DENIED', statusCode: 403 })
  t.match(logged, [{ consulNative: { event: 'no-decision', method: 'POST', path: '/x' } }])
  t.same(headersSet, [['connection', 'close']], 'the body that may follow is not read: the connection closes after the answer')

  // docs/semantics.md#transport-hook-order: an encapsulated context created before the plugin has
  // no decoration, so the request starts with `undefined`, not null.
  const undecorated = { ...request, consulDecision: undefined }
  outcome = undefined
  consulNativeBackstop(undecorated as never, reply as never, 'payload', (err, payload) => { outcome = [err, payload] })
  t.match(outcome?.[0], { code: 'FST_CONSUL_NATIVE_DENIED' }, 'undefined is no decision either')

  const decided = { ...request, consulDecision: { allow: true, reason: 'x' } }
  consulNativeBackstop(decided as never, reply as never, 'payload', (err, payload) => { outcome = [err, payload] })
  t.same(outcome, [null, 'payload'])
})
