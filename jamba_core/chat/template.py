"""Our Jamba 1.5+ chat template, written for this project.

It renders the same text as the template AI21 ships in the Jamba Mini 1.5-1.7 tokenizer configs (held as
a test fixture in ../shared/fixtures), for every input that template accepts. The format:

- every turn is ``<|bom|><|role|> text<|eom|>`` (``<|role|> (name)text`` when the message has a name);
- the first turn is always a system turn (empty when there is no system message) that carries the tool
  definitions, one pretty-printed JSON function per tool, inside ``<tool_definitions>``;
- documents and output modes ("knobs": citation mode, JSON mode) go in a second system turn placed just
  before the last user message;
- an assistant's tool calls follow its text as ``<tool_calls>[...]</tool_calls>``, and its citations (when
  citation mode is on) as ``<citations>[ids]</citations>``;
- the generation prompt is ``<|bom|><|assistant|>``, then `` preamble`` when ``generation_preamble`` is given.

Render it the way transformers' ``apply_chat_template`` does (trim_blocks, lstrip_blocks, a ``tojson`` filter
with ``indent``, a ``raise_exception`` global); every tag here trims its own whitespace, so the output does
not depend on those two settings. One deliberate difference: AI21's template fails on an assistant message
with ``citations`` when no ``knobs`` variable is passed; this one renders the message without them.
"""

JAMBA_CHAT_TEMPLATE = r"""
{%- set bom = bom_str or "<|bom|>" -%}
{%- set eom = eom_str or "<|eom|>" -%}
{%- if messages and messages[0].role == "system" -%}
  {%- set system = messages[0].content -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = default_system_message or "" -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- set has_system = system is defined and system is not none -%}
{%- set has_knobs = knobs is defined and knobs is not none and knobs.is_set -%}

{#- The leading system turn: system text, then tool definitions. -#}
{%- if bos_token is defined and bos_token is not none %}{{ bos_token }}{% endif -%}
{%- if has_system or tools -%}
  {{- bom ~ "<|system|> " -}}
  {%- if has_system %}{{ system }}{% endif -%}
  {%- if tools -%}
    {%- if system %}{{ "\n\n" }}{% endif -%}
    {{- "<tool_definitions>\n# Tools\n\n## Functions" -}}
    {%- for tool in tools -%}
      {%- if tool.type is defined and tool.type is not none -%}
        {%- if tool.type != "function" -%}
          {{- raise_exception("Currently, the only supported tool type is `function`") -}}
        {%- endif -%}
        {%- set tool = tool.function -%}
      {%- endif -%}
      {{- "\n\n" ~ tool|tojson(indent=2) -}}
    {%- endfor -%}
    {{- "\n</tool_definitions>" -}}
  {%- endif -%}
  {{- eom -}}
{%- endif -%}

{#- Documents and output modes go in a system turn just before the last user message (or the first turn). -#}
{%- set ns = namespace(last_user=0) -%}
{%- for message in turns -%}
  {%- if message.role == "user" %}{% set ns.last_user = loop.index0 %}{% endif -%}
{%- endfor -%}

{%- for message in turns -%}
  {%- if loop.index0 == ns.last_user and (documents or has_knobs) -%}
    {{- bom ~ "<|system|> " -}}
    {%- if documents -%}
      {{- "<documents>\n# Documents\n\nYou can use the following documents for reference:" -}}
      {%- for doc in documents -%}
        {{- "\n\n## Document ID: " ~ loop.index0 -}}
        {%- if doc.title is defined and doc.title is not none %}{{ "\nTitle: " ~ doc.title }}{% endif -%}
        {%- for key, value in doc.items() if key not in ["title", "text"] -%}
          {{- "\n" ~ key|title ~ ": " ~ value|string -}}
        {%- endfor -%}
        {{- "\nText: " ~ doc.text -}}
      {%- endfor -%}
      {{- "\n</documents>" -}}
    {%- endif -%}
    {%- if has_knobs -%}
      {%- if documents %}{{ "\n\n" }}{% endif -%}
      {{- "<active_output_modes>\n# Active Modes\n\nThe following modes configure the format or style of your"
          ~ " responses. You should adhere to all currently active modes simultaneously." -}}
      {%- if knobs.citation_mode == "fast" -%}
        {{- "\n\n## Citation Mode\n\nProvide a list of references only for the documents you base your response"
            ~ " on. Format your response with the original answer followed by a citation section. Use this"
            ~ " template: `{answer}<citations>DOCUMENT_IDS</citations>`, where DOCUMENT_IDS are the relevant"
            ~ " document numbers (e.g. [2, 5, 9]), or [] if the answer cannot be supported by the provided"
            ~ " documents." -}}
      {%- endif -%}
      {%- if knobs.response_format == "json_object" -%}
        {{- "\n\n## JSON Mode\n\nProvide your response in JSON format. Adhere strictly to any schema given by"
            ~ " the user. If an appropriate JSON format exists, use it without modification." -}}
      {%- endif -%}
      {{- "\n</active_output_modes>" -}}
    {%- endif -%}
    {{- eom -}}
  {%- endif -%}

  {#- The message itself: role, optional (name), content (JSON when it is not a string). -#}
  {{- bom ~ "<|" ~ message.role ~ "|> " -}}
  {%- if message.name is defined and message.name is not none %}{{ "(" ~ message.name ~ ")" }}{% endif -%}
  {%- set content = message.content or "" -%}
  {{- content if content is string else content|tojson -}}
  {%- if message.role == "assistant" and message.tool_calls -%}
    {{- "<tool_calls>[\n" -}}
    {%- for call in message.tool_calls -%}
      {%- if call.function is defined and call.function is not none %}{% set call = call.function %}{% endif -%}
      {%- set arguments = call.arguments if call.arguments is string else call.arguments|tojson -%}
      {{- '    {"name": "' ~ call.name ~ '", "arguments": ' ~ arguments ~ "}" -}}
      {{- "" if loop.last else ",\n" -}}
    {%- endfor -%}
    {{- "\n]</tool_calls>" -}}
  {%- endif -%}
  {%- if message.role == "assistant" and message.citations is defined and message.citations is not none
        and has_knobs and knobs.citation_mode != "off" -%}
    {{- "<citations>" ~ message.citations|map(attribute="document_id")|list|string ~ "</citations>" -}}
  {%- endif -%}
  {{- eom -}}
{%- endfor -%}

{%- if add_generation_prompt is not defined or add_generation_prompt -%}
  {{- bom ~ "<|" ~ (role_to_predict or "assistant") ~ "|>" -}}
  {%- if generation_preamble is defined and generation_preamble is not none and generation_preamble|trim -%}
    {{- " " ~ generation_preamble -}}
  {%- endif -%}
{%- endif -%}
""".strip()
