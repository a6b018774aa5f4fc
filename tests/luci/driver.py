#!/usr/bin/env python3
"""Headless Chromium on LuCI, driven by tests/luci.rs one command at a time.

Reads one JSON command per line on stdin and answers each with one JSON line on stdout:
{"ok": true, ...} or {"ok": false, "error": "...", "shown": "<what the view showed>"}.
Every wait is for a condition, up to the command's "timeout" in seconds. Ends (and quits
the browser) at the end of stdin or on SIGTERM.

What it reports as errors follows the LuCI rig's browser_check.py: SEVERE console entries
(but the login page's 403 and its calls made without a session), and failed ubus calls
(recorded by a hook on XMLHttpRequest, kept in sessionStorage across LuCI's own reloads),
but calls to services the rig does not have and LuCI's "preload" probe of a null document
root (the same on a device).
"""
import argparse
import base64
import json
import re
import signal
import sys

from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

# ubus objects (and object.method) of a real device that the rig does not run, as in
# browser_check.py's DEFAULT_ABSENT: calls to them fail there and are not the app's fault.
ABSENT = re.compile(r'^(network|network\..*|iwinfo|hostapd\..*|wpa_supplicant.*|dsl|fingerprint|service|'
                    r'container|log|dnsmasq.*|umdns|odhcpd|'
                    r'luci-rpc\.getWirelessDevices|luci\.getOdhcp6cStats|session\.access)$')

# Every /ubus JSON-RPC call and how it ended, appended to sessionStorage so that the record
# survives the reload LuCI does after Save & Apply.
XHR_HOOK = r"""
(function() {
  if (window.__kpfDoc) return;
  const doc = window.__kpfDoc = Math.random().toString(36).slice(2);
  const UBUS_STATUS = ['OK', 'INVALID_COMMAND', 'INVALID_ARGUMENT', 'METHOD_NOT_FOUND', 'NOT_FOUND',
                       'NO_DATA', 'PERMISSION_DENIED', 'TIMEOUT', 'NOT_SUPPORTED', 'UNKNOWN_ERROR',
                       'CONNECTION_FAILED', 'NO_MEMORY', 'PARSE_ERROR', 'SYSTEM_ERROR'];
  const record = (ent) => {
    const all = JSON.parse(sessionStorage.getItem('__kpfUbus') || '[]');
    all.push(ent);
    sessionStorage.setItem('__kpfUbus', JSON.stringify(all));
  };
  const O = XMLHttpRequest.prototype.open, S = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.open = function(m, u) { this.__kpfUrl = u; return O.apply(this, arguments); };
  XMLHttpRequest.prototype.send = function(body) {
    const url = String(this.__kpfUrl || '');
    if (url.indexOf('/ubus') !== -1 && typeof body === 'string') {
      let reqs; try { reqs = JSON.parse(body); } catch (e) { reqs = null; }
      if (reqs) {
        const list = Array.isArray(reqs) ? reqs : [reqs];
        this.addEventListener('loadend', () => {
          let res; try { res = JSON.parse(this.responseText); } catch (e) { res = null; }
          const rl = Array.isArray(res) ? res : [res];
          list.forEach((rq) => {
            const rs = rl.find((r) => r && r.id === rq.id) || null;
            const p = rq.params || [];
            const ent = { method: rq.method, object: p[1], fn: p[2], args: p[3], http: this.status,
                          page: location.pathname, doc: doc, secret: false };
            if (!rs) ent.error = 'no response';
            else if (rs.error) ent.error = rs.error.message + ' (' + rs.error.code + ')';
            else if (rq.method === 'call' && Array.isArray(rs.result) && rs.result[0] !== 0)
              ent.error = 'ubus status ' + rs.result[0] + ' (' + (UBUS_STATUS[rs.result[0]] || '?') + ')';
            const secret = sessionStorage.getItem('__kpfSecret');
            if (secret && this.responseText.indexOf(secret) !== -1) ent.secret = true;
            record(ent);
          });
        });
      }
    }
    return S.apply(this, arguments);
  };
})();
"""

# The status page as data: the header and one object per row of table#kpf-forwards.
STATUS_SNAPSHOT = r"""
const el = (id) => document.getElementById(id);
const text = (e) => e ? e.innerText.trim() : null;
const cell = (tr, cls) => text(tr.querySelector('td.' + cls));
const daemon = el('kpf-daemon');
return {
  daemon: daemon ? { state: daemon.getAttribute('data-state'), text: text(daemon) } : null,
  wan: text(el('kpf-wan')),
  upstream: text(el('kpf-upstream')),
  last_sync: text(el('kpf-last-sync')),
  kubeconfig_missing: !!el('kpf-kubeconfig-missing'),
  empty: text(el('kpf-empty')),
  table: !!document.querySelector('table#kpf-forwards'),
  error_boxes: Array.from(document.querySelectorAll(
      '#view .alert-message.error, #view .alert-message.danger, #maincontent .alert-message.error'))
    .map((e) => e.innerText.trim()),
  rows: Array.from(document.querySelectorAll('table#kpf-forwards tr.kpf-row')).map((tr) => ({
    state: tr.getAttribute('data-state'),
    key: tr.getAttribute('data-key'),
    service: tr.getAttribute('data-service'),
    port: cell(tr, 'kpf-port'),
    state_text: cell(tr, 'kpf-state'),
    reason: cell(tr, 'kpf-reason'),
    service_text: cell(tr, 'kpf-service'),
    backends: Array.from(tr.querySelectorAll('td.kpf-backends span.kpf-backend')).map((b) => ({
      health: b.getAttribute('data-health'), text: text(b) })),
    counters: cell(tr, 'kpf-counters'),
    upstream: cell(tr, 'kpf-upstream'),
    dns: cell(tr, 'kpf-dns'),
  })),
};
"""

VIEW_SETTLED = r"""
const v = document.getElementById('view');
return !!v && !v.querySelector(':scope > .spinning') && v.children.length > 0;
"""


class Failed(Exception):
    """A command that could not do what it was asked; the answer says what the page showed."""


class Driver:
    def __init__(self, a):
        opts = webdriver.ChromeOptions()
        opts.binary_location = a.chromium
        for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                    '--window-size=1280,1000', '--lang=en-US', '--no-first-run',
                    '--disable-extensions', '--disable-background-networking'):
            opts.add_argument(arg)
        opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
        self.base = a.base.rstrip('/')
        self.drv = webdriver.Chrome(service=Service(a.chromedriver), options=opts)
        self.drv.execute_cdp_cmd('Page.addScriptToEvaluateOnNewDocument', {'source': XHR_HOOK})
        self.console = []
        self.label = 'start'
        self.login_page = None

    def view_text(self):
        try:
            return self.drv.execute_script(
                "const v = document.getElementById('maincontent') || document.body;"
                " return v ? v.innerText.slice(0, 4000) : ''")
        except WebDriverException as e:
            return f'(no page: {e.msg})'

    def until(self, timeout, what, condition):
        try:
            return WebDriverWait(self.drv, timeout, poll_frequency=0.1,
                                 ignored_exceptions=(WebDriverException,)).until(condition)
        except TimeoutException:
            raise Failed(f'timed out after {timeout} s waiting for {what}') from None

    def drain_console(self, benign=lambda msg: False):
        for e in self.drv.get_log('browser'):
            msg = e.get('message') or ''
            self.console.append({'page': self.label, 'level': e.get('level'), 'message': msg,
                                 'severe': e.get('level') == 'SEVERE' and not benign(msg)})

    def visible(self, by, name):
        return [e for e in self.drv.find_elements(by, name) if e.is_displayed()]

    def settled(self, timeout, what):
        self.until(timeout, what, lambda d: d.execute_script(VIEW_SETTLED))

    # ---- commands

    def login(self, c):
        self.label = 'login'
        self.drv.set_page_load_timeout(c['timeout'])
        self.drv.get(self.base + '/cgi-bin/luci/')
        self.until(c['timeout'], 'the login form', lambda d: self.visible(By.NAME, 'luci_password'))
        # The login page is served with status 403, and LuCI's calls made before there is a
        # session are denied: the same on a device.
        self.drain_console(lambda msg: ('status of 403' in msg and '/cgi-bin/luci/ ' in msg + ' ')
                           or 'Login session is expired' in msg or 'error -32002' in msg)
        user = self.visible(By.NAME, 'luci_username')
        if user:
            user[0].clear()
            user[0].send_keys(c['user'])
        password = self.visible(By.NAME, 'luci_password')[0]
        password.send_keys(c['password'])
        # Calls made by the login page, without a session, fail on a device too.
        self.login_page = self.drv.execute_script('return window.__kpfDoc;')
        password.send_keys(Keys.ENTER)
        self.label = 'admin/status/overview'
        self.until(c['timeout'], 'Status > Overview after logging in',
                   lambda d: d.execute_script(VIEW_SETTLED) and 'Hostname' in d.find_element(By.ID, 'view').text)
        self.drain_console()
        return {'links': self.links()}

    def links(self):
        return self.drv.execute_script(
            "return Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))")

    def open(self, c):
        self.drain_console()
        self.label = c['path']
        self.drv.get(self.base + '/cgi-bin/luci/' + c['path'])
        self.settled(c['timeout'], f"the view of {c['path']} to render")
        return {'links': self.links()}

    def status(self, c):
        """Waits until the status page shows `rows` rows, then returns what it shows."""
        want = c['rows']
        self.until(c['timeout'], f'{want} rows in table#kpf-forwards',
                   lambda d: len(d.execute_script(STATUS_SNAPSHOT)['rows']) == want)
        return {'page': self.drv.execute_script(STATUS_SNAPSHOT)}

    def wait_attr(self, c):
        """Waits until `css` has attribute `attr` = `value`, without reloading the page."""
        css, attr, value = c['css'], c['attr'], c['value']

        def shown(d):
            found = d.find_elements(By.CSS_SELECTOR, css)
            return bool(found) and found[0].get_attribute(attr) == value
        self.until(c['timeout'], f'{css} with {attr}="{value}"', shown)
        return {'text': self.text_of(css)}

    def wait_css(self, c):
        """Waits until an element matches `css`, without reloading the page."""
        self.until(c['timeout'], c['css'], lambda d: d.find_elements(By.CSS_SELECTOR, c['css']))
        return {}

    def text_of(self, css):
        """The text of the first element matching `css`, shown or on a hidden tab; None
        when there is none."""
        found = self.drv.find_elements(By.CSS_SELECTOR, css)
        return found[0].get_attribute('textContent').strip() if found else None

    def wait_text(self, c):
        """Waits until the text of `css` matches the regex `pattern`, without reloading."""
        css, pattern = c['css'], re.compile(c['pattern'])
        self.until(c['timeout'], f'{css} to match /{c["pattern"]}/',
                   lambda d: pattern.search(self.text_of(css) or ''))
        return {'text': self.text_of(css)}

    def shot(self, c):
        """A full-page screenshot from the top, once LuCI's fades and flashes are over
        (endless animations, such as a spinner, are not waited for)."""
        self.drv.execute_script('window.scrollTo(0, 0);')
        self.until(c['timeout'], 'animations to end before the screenshot', lambda d: d.execute_script(
            "return document.getAnimations().every((a) => a.playState !== 'running'"
            " || a.effect.getComputedTiming().endTime === Infinity);"))
        m = self.drv.execute_cdp_cmd('Page.getLayoutMetrics', {})
        size = m.get('cssContentSize') or m['contentSize']
        png = self.drv.execute_cdp_cmd('Page.captureScreenshot', {
            'format': 'png', 'captureBeyondViewport': True,
            'clip': {'x': 0, 'y': 0, 'width': size['width'], 'height': min(size['height'], 6000), 'scale': 1}})
        with open(c['path'], 'wb') as f:
            f.write(base64.b64decode(png['data']))
        return {}

    def widget(self, option):
        cbid = f'cbid.kube-port-forward.main.{option}'
        found = self.drv.find_elements(By.ID, cbid) + self.drv.find_elements(By.ID, 'widget.' + cbid)
        if not found:
            raise Failed(f'no field for option {option!r} (no #{cbid} nor #widget.{cbid})')
        return cbid

    def show(self, c):
        """Shows the form tab that holds the field of `option`."""
        self.show_tab(self.widget(c['option']))
        return {}

    def show_tab(self, cbid):
        """Clicks the form tab that holds the element `cbid` (or `widget.cbid`), if it is on one."""
        tab = self.drv.execute_script("""
            const el = document.getElementById(arguments[0]) || document.getElementById('widget.' + arguments[0]);
            const pane = el && el.closest('[data-tab]');
            return pane ? document.querySelector('.cbi-tabmenu > li[data-tab="'
                                                 + pane.getAttribute('data-tab') + '"] > a') : null;
        """, cbid)
        if tab is not None:
            tab.click()

    def fill(self, c):
        """Types each value into its LuCI field as a user would: text fields, selects, flags
        (true/false) and dynamic lists (a list of strings replaces the items)."""
        for option, value in c['values'].items():
            try:
                self.fill_one(option, value)
            except WebDriverException as e:
                raise Failed(f'cannot fill {option!r} with {value!r}: {e.msg}') from None
        return {}

    def fill_one(self, option, value):
        cbid = self.widget(option)
        self.show_tab(cbid)
        frame = self.drv.find_element(By.ID, cbid)
        if isinstance(value, list):
            if 'cbi-dynlist' not in (frame.get_attribute('class') or ''):
                raise Failed(f'option {option!r} is not a dynamic list (#{cbid} is {frame.tag_name}.'
                             f'{frame.get_attribute("class")})')
            for item in frame.find_elements(By.CSS_SELECTOR, ':scope > .item'):
                item.send_keys(Keys.DELETE)
            field = self.drv.find_element(By.ID, 'widget.' + cbid)
            for v in value:
                field.send_keys(v, Keys.ENTER)
            return
        if 'cbi-checkbox' in (frame.get_attribute('class') or ''):
            box = frame.find_element(By.CSS_SELECTOR, 'input[type="checkbox"]')
            if box.is_selected() != bool(value):
                # Themes may draw the box on its label and hide the input.
                target = box if box.is_displayed() else \
                    frame.find_element(By.CSS_SELECTOR, f'label[for="{box.get_attribute("id")}"]')
                target.click()
            return
        element = self.drv.find_element(By.ID, 'widget.' + cbid)
        if element.tag_name.lower() == 'select':
            element.find_element(By.CSS_SELECTOR, f'option[value="{value}"]').click()
        else:
            element.clear()
            element.send_keys(value)
            element.send_keys(Keys.TAB)

    def notifications(self, css='#maincontent .alert-message'):
        return self.drv.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]))"
            ".map(e => e.innerText.trim()).filter(t => t)", css)

    def save_apply(self, c):
        """Clicks Save & Apply. Answers once LuCI says the changes were applied and has
        reloaded the view, or once the page shows a notification instead (a refusal)."""
        self.drain_console()
        self.drv.execute_script('window.__kpfBefore = true;')
        button = self.drv.find_element(By.CSS_SELECTOR, '.cbi-page-actions .cbi-button-apply')
        button.click()

        def outcome(d):
            if self.notifications():
                return 'refused'
            modal = d.execute_script(
                "const m = document.querySelector('#modal_overlay .alert-message');"
                " return m ? m.innerText : ''")
            if 'Configuration changes applied' in modal:
                return 'applied'
            return None
        result = self.until(c['timeout'], 'Save & Apply to end (applied, or a notification)', outcome)
        if result == 'applied':
            self.until(c['timeout'], 'the view to reload after applying',
                       lambda d: not d.execute_script('return window.__kpfBefore === true;')
                       and d.execute_script(VIEW_SETTLED))
        invalid = self.drv.execute_script(
            "return Array.from(document.querySelectorAll('.cbi-input-invalid, .cbi-value-error'))"
            ".map(e => e.id || (e.closest('[data-name]') || e).getAttribute('data-name') || e.className)")
        return {'result': result, 'notifications': self.notifications(), 'invalid': invalid}

    def upload(self, c):
        """Uploads the file `path` as the kubeconfig; answers once #kpf-kubeconfig-state
        changed, with whether `secret` ever showed in the page or in an ubus answer."""
        self.drv.execute_script("sessionStorage.setItem('__kpfSecret', arguments[0]);", c['secret'])
        self.show_tab('kpf-kubeconfig-file')
        before = self.text_of('#kpf-kubeconfig-state')
        self.drv.find_element(By.CSS_SELECTOR, 'input#kpf-kubeconfig-file').send_keys(c['path'])
        self.drv.find_element(By.ID, 'kpf-kubeconfig-upload').click()
        self.until(c['timeout'], f'#kpf-kubeconfig-state to change from {before!r}, or an error',
                   lambda d: self.text_of('#kpf-kubeconfig-state') != before
                   or self.notifications('#maincontent .alert-message:is(.danger, .error, .warning)'))
        return {'before': before, 'state': self.text_of('#kpf-kubeconfig-state'),
                'notifications': self.notifications()}

    def secret_shown(self, c):
        """Whether `secret` is anywhere in the page's DOM or was in an ubus answer."""
        html = self.drv.execute_script('return document.documentElement.outerHTML;')
        calls = json.loads(self.drv.execute_script("return sessionStorage.getItem('__kpfUbus') || '[]';"))
        return {'in_page': c['secret'] in html,
                'in_answers': [f"{x.get('object')}.{x.get('fn')}" for x in calls if x.get('secret')]}

    def report(self, c):
        """SEVERE console entries and failed ubus calls, split as browser_check.py does."""
        self.drain_console()
        calls = json.loads(self.drv.execute_script("return sessionStorage.getItem('__kpfUbus') || '[]';"))
        errors, absent, upstream = [], [], []
        for call in calls:
            if not call.get('error') or call.get('doc') == self.login_page:
                continue
            obj = call.get('object') or ''
            args = call.get('args') if isinstance(call.get('args'), dict) else {}
            line = f"[{call.get('page')}] {call.get('method')} {obj}.{call.get('fn')} {json.dumps(args)}: {call['error']}"
            if call.get('method') == 'call' and (ABSENT.match(obj) or ABSENT.match(f"{obj}.{call.get('fn')}")):
                absent.append(line)
            elif obj == 'file' and str(args.get('path', '')).startswith('null/'):
                upstream.append(line)
            else:
                errors.append(line)
        return {'calls': len(calls), 'ubus_errors': errors, 'ubus_absent': sorted(set(absent)),
                'ubus_upstream': upstream,
                'console_errors': [f"[{e['page']}] {e['message']}" for e in self.console if e['severe']]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--base', required=True)
    ap.add_argument('--chromium', default='/usr/bin/chromium')
    ap.add_argument('--chromedriver', default='/usr/bin/chromedriver')
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    d = Driver(a)
    try:
        for line in sys.stdin:
            c = json.loads(line)
            try:
                answer = {'ok': True, **getattr(d, c['cmd'])(c)}
            except (Failed, WebDriverException) as e:
                answer = {'ok': False, 'error': str(e).strip() or type(e).__name__, 'shown': d.view_text()}
            print(json.dumps(answer), flush=True)
    finally:
        d.drv.quit()


if __name__ == '__main__':
    main()
