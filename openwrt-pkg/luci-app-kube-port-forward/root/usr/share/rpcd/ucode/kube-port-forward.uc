// rpcd ucode plugin of luci-app-kube-port-forward: the ubus object "kube-port-forward".
//   status          what the daemon's own `status --output json` says, with the kubeconfig's
//                   presence and whether the service is enabled in UCI
//   validate        `run --check` with the flags the init script would build from UCI values
//   set_kubeconfig  stores a kubeconfig the daemon accepts, mode 0600; nothing reads it back
'use strict';

import { popen, open, stat, rename, chmod, unlink, mkdir, dirname, basename, access } from 'fs';
import { cursor } from 'uci';
import { connect } from 'ubus';

const PROG = '/usr/sbin/kube-port-forward';
const CONF = 'kube-port-forward';
const SECTION = 'main';
const DEFAULT_KUBECONFIG = '/etc/kube-port-forward/kubeconfig';
const TABLE = 'kube_port_forward';

// UCI option -> the daemon's flag, in the order the init script adds them
// (/etc/init.d/kube-port-forward, start_service). Kinds:
//   global   --flag before `run`, when the boolean option is on
//   file     --flag PATH (the kubeconfig: given only when the file is there, see flags())
//   value    --flag VALUE when set (a list's items joined by spaces, as config_get gives them)
//   list     --flag WORD for each whitespace-separated word (the init script's `for`)
//   joined   one --flag with the words joined by commas
//   wan      --wan-interface for each device: the networks' own devices, then those named,
//            each once (wan_network and wan_device share this place)
//   switch   --flag true|false, from a boolean option with the default given
//   bool     --flag when the boolean option is on
// policy: left out when policy_file is set, which then holds the whole policy.
const FLAGS = [
	{ option: 'verbose', flag: '--verbose', kind: 'global' },
	{ option: 'kubeconfig', flag: '--kubeconfig', kind: 'file' },
	{ option: 'context', flag: '--context', kind: 'value' },
	{ option: 'namespace', flag: '--namespace', kind: 'list' },
	{ option: 'selector', flag: '--selector', kind: 'value' },
	{ option: 'wan_network', flag: '--wan-interface', kind: 'wan' },
	{ option: 'wan_device', flag: '--wan-interface', kind: 'wan' },
	{ option: 'wan_address', flag: '--wan-address', kind: 'list' },
	{ option: 'reflection', flag: '--reflection', kind: 'switch', default: true },
	{ option: 'ct_mark', flag: '--ct-mark', kind: 'value' },
	{ option: 'health', flag: '--health', kind: 'value' },
	{ option: 'policy_file', flag: '--policy', kind: 'value' },
	{ option: 'allow_namespace', flag: '--allow-namespace', kind: 'list', policy: true },
	{ option: 'allow_namespace_selector', flag: '--allow-namespace-selector', kind: 'value', policy: true },
	{ option: 'allow_ports', flag: '--allow-ports', kind: 'joined', policy: true },
	{ option: 'allow_target', flag: '--allow-target', kind: 'list', policy: true },
	{ option: 'allow_external_ips', flag: '--allow-external-ips', kind: 'bool', policy: true },
	{ option: 'node_ports', flag: '--node-ports', kind: 'value', policy: true },
	{ option: 'check_interval', flag: '--check-interval', kind: 'value' },
	{ option: 'check_timeout', flag: '--check-timeout', kind: 'value' },
	{ option: 'check_fall', flag: '--check-fall', kind: 'value' },
	{ option: 'check_rise', flag: '--check-rise', kind: 'value' },
	{ option: 'check_concurrency', flag: '--check-concurrency', kind: 'value' },
	{ option: 'upstream', flag: '--upstream', kind: 'value' },
	{ option: 'upstream_url', flag: '--upstream-url', kind: 'value' },
	{ option: 'upstream_lease', flag: '--upstream-lease', kind: 'value' },
	{ option: 'upstream_poll', flag: '--upstream-poll', kind: 'value' },
	{ option: 'dns_targets', flag: '--dns-targets', kind: 'bool' },
	{ option: 'finalizer', flag: '--finalizer', kind: 'value' },
	{ option: 'instance', flag: '--instance', kind: 'value' },
	{ option: 'cleanup_deadline', flag: '--cleanup-deadline', kind: 'value' },
	{ option: 'resync', flag: '--resync', kind: 'value' }
];

function shellquote(s) {
	return `'${replace(s, "'", "'\\''")}'`;
}

// Runs PROG with these arguments; its stdout and stderr together, and its exit status.
function run(args) {
	if (!access(PROG, 'x'))
		return { code: 127, output: `${PROG} is not installed` };

	const proc = popen(join(' ', map([ PROG, ...args ], shellquote)) + ' 2>&1', 'r');

	if (!proc)
		return { code: 127, output: `cannot run ${PROG}` };

	const output = proc.read('all') ?? '';

	return { code: proc.close(), output };
}

// An option's value as config_get gives it to the init script: a list's items joined by spaces.
function text(value) {
	if (type(value) == 'array')
		return join(' ', value);

	return (value == null) ? '' : `${value}`;
}

function words(value) {
	return filter(split(trim(text(value)), /[ \t\n]+/), (w) => length(w) > 0);
}

// config_get_bool's reading of a boolean option.
function bool(value, fallback) {
	switch (text(value)) {
	case '1': case 'on': case 'true': case 'yes': case 'enabled':
		return true;
	case '0': case 'off': case 'false': case 'no': case 'disabled':
		return false;
	default:
		return fallback;
	}
}

// The device of a logical network that is up (network_get_device, else network_get_physdev).
// A network that is not up is checked under its own name: the daemon's rules for the flag
// are the same, and the init script waits for that network to come up.
function network_device(bus, network) {
	const status = bus?.call(`network.interface.${network}`, 'status');

	return status?.l3_device ?? status?.device ?? network;
}

function wan_devices(values) {
	const devices = [];
	const bus = length(words(values.wan_network)) ? connect() : null;

	for (let network in words(values.wan_network))
		push(devices, network_device(bus, network));

	push(devices, ...words(values.wan_device));

	return uniq(devices);
}

function kubeconfig_path(values) {
	return text(values.kubeconfig) || DEFAULT_KUBECONFIG;
}

// The arguments of `run --check` for these UCI values. The kubeconfig is read only when it is
// there: settings may be saved before one is uploaded (the init script then waits for it).
function flags(values, kubeconfig) {
	const before = [], after = [];
	const policy_file = text(values.policy_file);
	let wan_done = false;

	for (let f in FLAGS) {
		const value = values[f.option];

		if (f.policy && policy_file != '')
			continue;

		switch (f.kind) {
		case 'global':
			if (bool(value, false))
				push(before, f.flag);
			break;

		case 'file':
			if (stat(kubeconfig)?.type == 'file')
				push(after, f.flag, kubeconfig);
			break;

		case 'value':
			if (text(value) != '')
				push(after, f.flag, text(value));
			break;

		case 'list':
			for (let w in words(value))
				push(after, f.flag, w);
			break;

		case 'joined':
			if (length(words(value)))
				push(after, f.flag, join(',', words(value)));
			break;

		case 'wan':
			if (!wan_done)
				for (let device in wan_devices(values))
					push(after, f.flag, device);
			wan_done = true;
			break;

		case 'switch':
			push(after, f.flag, bool(value, f.default) ? 'true' : 'false');
			break;

		case 'bool':
			if (bool(value, false))
				push(after, f.flag);
			break;
		}
	}

	return [ ...before, 'run', '--check', ...after, '--table', TABLE ];
}

// Where FLAG is named in MESSAGE as a whole flag (not as the start of a longer one), or -1.
function flag_at(message, flag) {
	for (let from = 0; ; ) {
		let i = index(substr(message, from), flag);

		if (i < 0)
			return -1;

		i += from;

		if (!match(substr(message, i + length(flag), 1), /^[a-z0-9-]$/))
			return i;

		from = i + 1;
	}
}

// The UCI option the daemon's message is about: the first flag it names, else the file it names.
function option_at_fault(message, values) {
	let found = null, at = length(message);

	for (let f in FLAGS) {
		const i = flag_at(message, f.flag);

		if (i >= 0 && i < at) {
			found = f.option;
			at = i;
		}
	}

	if (found == 'wan_network')
		for (let device in words(values.wan_device))
			if (index(message, device) >= 0)
				return 'wan_device';

	if (found == null && text(values.policy_file) != '' && index(message, text(values.policy_file)) >= 0)
		return 'policy_file';

	if (found == null && index(message, kubeconfig_path(values)) >= 0)
		return 'kubeconfig';

	return found;
}

function check(values, kubeconfig) {
	const result = run(flags(values, kubeconfig));

	if (result.code == 0)
		return { ok: true };

	// The daemon's own words, without the "error: " its command line puts before them.
	const message = replace(trim(result.output), /^error: /, '');

	return { ok: false, message: message || `${PROG} exited with status ${result.code}` };
}

function saved_values() {
	return cursor().get_all(CONF, SECTION) ?? {};
}

function kubeconfig_state(path) {
	const st = stat(path);

	return { path, present: st?.type == 'file', mtime: st?.mtime ?? null };
}

const methods = {
	status: {
		call: function() {
			const values = saved_values();
			const extra = {
				kubeconfig: kubeconfig_state(kubeconfig_path(values)),
				enabled: bool(values.enabled, false),
				now: time()
			};
			const result = run([ 'status', '--output', 'json' ]);
			let status = null;

			if (result.code == 0) {
				try {
					status = json(result.output);
				}
				catch (e) {
					status = null;
				}
			}

			if (type(status) != 'object')
				return { error: trim(result.output) || `${PROG} exited with status ${result.code}`, ...extra };

			return { ...status, ...extra };
		}
	},

	validate: {
		args: { values: {} },
		call: function(req) {
			const values = req.args?.values;

			if (type(values) != 'object')
				return { ok: false, option: null, message: 'values: an object of UCI options is required' };

			const result = check(values, kubeconfig_path(values));

			if (!result.ok)
				result.option = option_at_fault(result.message, values);

			return result;
		}
	},

	set_kubeconfig: {
		args: { content: '', context: '' },
		call: function(req) {
			const content = req.args?.content;

			if (type(content) != 'string' || content == '')
				return { ok: false, message: 'content: the kubeconfig file is empty' };

			// Checked with the saved settings, but the context the form holds now: a kubeconfig
			// of another cluster comes with its own context, saved after it.
			const values = saved_values();
			const path = kubeconfig_path(values);
			const dir = dirname(path);

			if (type(req.args?.context) == 'string')
				values.context = req.args.context;

			if (stat(dir)?.type != 'directory' && !mkdir(dir, 0o700))
				return { ok: false, message: `cannot create ${dir}` };

			// O_EXCL in the target folder: never through a link, and renamed over the old one
			// whole, so the daemon never reads half a file.
			let tmp = null, fd = null;

			for (let n = 0; !fd && n < 8; n++) {
				tmp = sprintf('%s/.%s.upload-%d-%d', dir, basename(path), time(), n);
				fd = open(tmp, 'wx', 0o600);
			}

			if (!fd)
				return { ok: false, message: `cannot write in ${dir}` };

			const written = fd.write(content);
			fd.close();

			if (written != length(content) || !chmod(tmp, 0o600)) {
				unlink(tmp);
				return { ok: false, message: `cannot write in ${dir}` };
			}

			const result = check(values, tmp);

			if (!result.ok) {
				unlink(tmp);
				return { ok: false, message: replace(result.message, tmp, 'the uploaded kubeconfig') };
			}

			if (!rename(tmp, path)) {
				unlink(tmp);
				return { ok: false, message: `cannot replace ${path}` };
			}

			return { ok: true };
		}
	}
};

return { 'kube-port-forward': methods };
